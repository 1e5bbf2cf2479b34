//! A real headless browser for the console's tests: Debian's `chromium` driven over WebDriver by
//! its `chromedriver`, each test with a fresh profile. Never downloaded at test time: both come
//! from the system's packages (`.ci/prepare-tests` installs them).
use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::{eventually, free_addr};

/// The flags every test browser starts with. Without the background-networking ones Chromium
/// keeps calling home, which floods a closed network.
const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// Windows narrower than this are phones.
const PHONE_WIDTH: u32 = 600;

fn installed(program: &str) -> PathBuf {
    let out = Command::new("which")
        .arg(program)
        .output()
        .expect("running which");
    assert!(
        out.status.success(),
        "{program} is not installed: the console's browser tests need Debian's chromium and \
         chromium-driver packages (.ci/prepare-tests installs them)"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A chromedriver and the headless Chromium it drives; both end when dropped.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A browser with a fresh profile and a window of `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let chromium = installed("chromium");
        let chromedriver = installed("chromedriver");
        let profile = tempfile::tempdir().expect("a profile directory");
        let port = free_addr().port();
        // Its own process group: the browser it starts stays in it, so a test that panics
        // before `close` still takes the browser down with the driver (see Drop).
        let driver = Command::new(chromedriver)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let webdriver = format!("http://127.0.0.1:{port}");
        eventually(
            Duration::from_secs(20),
            "chromedriver listening",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.push(format!("--window-size={width},{height}"));
        let mut options = serde_json::json!({ "binary": chromium, "args": args });
        if width < PHONE_WIDTH {
            // A desktop window cannot be narrower than ~500 px: a phone is emulated instead.
            options["mobileEmulation"] = serde_json::json!({
                "deviceMetrics": { "width": width, "height": height, "pixelRatio": 2.0 }
            });
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&webdriver)
            .await
            .expect("a WebDriver session with headless Chromium");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Saves a screenshot of the page as `name`.png under `target/console-screenshots/` (kept
    /// out of the repository) and returns where it went.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = std::env::current_exe()
            .expect("test executable")
            .ancestors()
            .nth(3)
            .expect("the target directory")
            .join("console-screenshots");
        std::fs::create_dir_all(&dir).expect("the screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("writing the screenshot");
        path
    }

    /// Ends the session, and with it the browser.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }

    /// Clicks the first element `css` selects. Live pages swap their content in place, so the
    /// element may be replaced between finding and clicking it: found again until the click
    /// lands (5 s at most).
    pub async fn click(&self, css: &str) {
        self.retry(
            css,
            "clicking",
            |e| async move { e.click().await.map(|_| ()) },
        )
        .await;
    }

    /// Types `text` into the first element `css` selects (found again like [`Browser::click`]).
    pub async fn type_into(&self, css: &str, text: &str) {
        self.retry(
            css,
            "typing into",
            |e| async move { e.send_keys(text).await },
        )
        .await;
    }

    async fn retry<F, Fut>(&self, css: &str, what: &str, act: F)
    where
        F: Fn(fantoccini::elements::Element) -> Fut,
        Fut: std::future::Future<Output = Result<(), fantoccini::error::CmdError>>,
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let outcome = match self.client.find(fantoccini::Locator::Css(css)).await {
                Ok(element) => act(element).await,
                Err(err) => Err(err),
            };
            match outcome {
                Ok(()) => return,
                Err(err) if std::time::Instant::now() >= deadline => {
                    panic!("{what} {css:?}: {err}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The visible text of the first element `css` selects. Live pages swap their content in
    /// place, so an element found a moment ago may be gone: looked up again until it holds
    /// still (5 s at most).
    pub async fn text_of(&self, css: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let found = self.client.find(fantoccini::Locator::Css(css)).await;
            if let Ok(element) = found
                && let Ok(text) = element.text().await
            {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no element {css:?} on the page"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the page's visible text holds `text`; panics with what it shows after
    /// `within`.
    pub async fn wait_for_text(&self, text: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let page = self.text().await;
            if page.contains(text) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {text:?}; it shows:\n{page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's visible text; empty while a navigation replaces the document.
    pub async fn text(&self) -> String {
        match self.client.find(fantoccini::Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browser processes it started (a SIGKILLed
        // chromedriver would leave them running, reparented to init).
        if let Some(group) = rustix::process::Pid::from_raw(self.driver.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.driver.wait();
    }
}
