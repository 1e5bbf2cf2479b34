//! The web console (SPEC §13) in a real headless Chromium, and its HTTP contract (headers,
//! downloads, errors) over a raw socket. Screenshots go to `target/console-screenshots/`.

use std::time::Duration;

use fantoccini::Locator;
use kanade_shared::{
    pb,
    wire::{self, EventBody, ExecStatus},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use kanade_testkit::{Browser, Run, TestDb, TestIngest, add_token, eventually};

/// Publishes a finished run whose stdout is `stdout`.
async fn publish_finished(ingest: &TestIngest, run: &Run, status: ExecStatus, stdout: &str) {
    ingest.publish(EventBody::Started(run.started())).await;
    let mut result = run.result(
        status,
        Some(if status == ExecStatus::Succeeded {
            0
        } else {
            2
        }),
    );
    result.stdout = stdout.to_string();
    result.stderr = "warning: disk almost full\n".into();
    ingest.publish(EventBody::Result(result)).await;
}

/// One HTTP/1.1 GET over a raw socket: (status, head lowercased, body).
async fn http_get(ingest: &TestIngest, path: &str) -> (u16, String, String) {
    http_get_with(ingest, path, "").await
}

/// The same with `headers` (each line ending in `\r\n`) added to the request.
async fn http_get_with(ingest: &TestIngest, path: &str, headers: &str) -> (u16, String, String) {
    let addr = ingest.console_addr.expect("a console");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Marks the document so a test can tell a live update (marker kept) from a reload (gone).
async fn mark_document(browser: &Browser) {
    browser
        .client
        .execute("window.kanadeTestMarker = 42;", vec![])
        .await
        .unwrap();
}

async fn still_marked(browser: &Browser) -> bool {
    browser
        .client
        .execute("return window.kanadeTestMarker === 42;", vec![])
        .await
        .unwrap()
        == serde_json::json!(true)
}

#[tokio::test]
async fn a_newcomer_watches_a_run_arrive_opens_it_and_filters() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let browser = Browser::start(1280, 800).await;
    let client = &browser.client;
    client.goto(&ingest.console_url()).await.unwrap();
    browser
        .wait_for_text("No runs yet", Duration::from_secs(5))
        .await;

    // A run appears without a reload: first running, then failed.
    mark_document(&browser).await;
    let run = Run::new("pc-console");
    ingest.publish(EventBody::Started(run.started())).await;
    browser
        .wait_for_text("Running now (1)", Duration::from_secs(5))
        .await;
    let mut failed = run.result(ExecStatus::Failed, Some(2));
    failed.stdout = "disk: 93% used\nsecond line\n".into();
    failed.stderr = "warning: disk almost full\n".into();
    ingest.publish(EventBody::Result(failed)).await;
    browser
        .wait_for_text("Running now (0)", Duration::from_secs(5))
        .await;
    assert!(
        still_marked(&browser).await,
        "the page updated itself, no reload"
    );
    let page = browser.text().await;
    assert!(
        page.contains("pc-console") && page.contains("disk: 93% used"),
        "{page}"
    );
    assert!(
        !page.contains("second line"),
        "a table cell shows the first line only"
    );
    // A successful run beside it, for the filter below.
    publish_finished(
        &ingest,
        &Run::new("pc-other"),
        ExecStatus::Succeeded,
        "ok\n",
    )
    .await;
    browser
        .wait_for_text("pc-other", Duration::from_secs(5))
        .await;
    browser.screenshot("activity").await;

    // Clicking the failed run opens its page with both outputs whole.
    browser
        .click(&format!("a[href='/runs/{}']", run.result_id))
        .await;
    client
        .wait()
        .for_element(Locator::Css("#out-stdout"))
        .await
        .unwrap();
    assert_eq!(
        browser.text_of("#out-stdout").await,
        "disk: 93% used\nsecond line"
    );
    assert_eq!(
        browser.text_of("#out-stderr").await,
        "warning: disk almost full"
    );
    let page = browser.text().await;
    assert!(page.contains("failed, exit code 2"), "{page}");
    assert!(
        page.contains("kanade.v1.Activity/GetExecution"),
        "the grpcurl command: {page}"
    );
    browser.screenshot("run").await;

    // The filter form writes the URL; the back button restores the earlier view.
    client.goto(&ingest.console_url()).await.unwrap();
    browser.click("input[name=state][value=failed]").await;
    browser.click("form.filters button[type=submit]").await;
    eventually(Duration::from_secs(5), "the filtered URL", || async {
        client.current_url().await.unwrap().query() == Some("state=failed")
    })
    .await;
    let page = browser.text().await;
    assert!(
        page.contains("pc-console") && !page.contains("pc-other"),
        "{page}"
    );
    browser.type_into("input[name=pc]", "pc-nobody").await;
    browser.click("form.filters button[type=submit]").await;
    browser
        .wait_for_text("No runs match these filters", Duration::from_secs(5))
        .await;
    assert_eq!(
        client.current_url().await.unwrap().query(),
        Some("state=failed&pc=pc-nobody")
    );
    client.back().await.unwrap();
    browser
        .wait_for_text("pc-console", Duration::from_secs(5))
        .await;
    assert_eq!(
        client.current_url().await.unwrap().query(),
        Some("state=failed")
    );
    let checked = client
        .find(Locator::Css("input[name=state][value=failed]"))
        .await
        .unwrap()
        .prop("checked")
        .await
        .unwrap();
    assert_eq!(
        checked.as_deref(),
        Some("true"),
        "the form shows the view's filters"
    );

    // The manifests page counts both runs.
    client
        .goto(&format!("{}/manifests?window=1h", ingest.console_url()))
        .await
        .unwrap();
    let row = browser.text_of("table.manifests tbody tr").await;
    assert!(row.starts_with("inventory 2 0 1 1 0"), "{row}");
    browser.close().await;
}

#[tokio::test]
async fn on_a_phone_the_activity_page_fits_the_screen() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    publish_finished(
        &ingest,
        &Run::new("pc-phone"),
        ExecStatus::Failed,
        "exit 2\n",
    )
    .await;
    let browser = Browser::start(390, 844).await;
    browser.client.goto(&ingest.console_url()).await.unwrap();
    browser
        .wait_for_text("pc-phone", Duration::from_secs(5))
        .await;
    // The page itself never scrolls sideways; the table scrolls inside its own box.
    let overflow = browser
        .client
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(overflow, serde_json::json!(0), "horizontal overflow in px");
    browser.screenshot("activity-phone").await;
    browser.close().await;
}

#[tokio::test]
async fn hostile_output_is_shown_as_text_and_runs_nothing() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let hostile =
        "<script>window.kanadePwned = 1</script><img src=x onerror=\"window.kanadePwned = 2\">";
    let run = Run::new("pc-\"><b>bold</b>");
    publish_finished(&ingest, &run, ExecStatus::Failed, hostile).await;
    let browser = Browser::start(1280, 800).await;
    for page in ["/".to_string(), format!("/runs/{}", run.result_id)] {
        browser
            .client
            .goto(&format!("{}{page}", ingest.console_url()))
            .await
            .unwrap();
        browser
            .wait_for_text("window.kanadePwned = 1", Duration::from_secs(5))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pwned = browser
            .client
            .execute("return typeof window.kanadePwned;", vec![])
            .await
            .unwrap();
        assert_eq!(
            pwned,
            serde_json::json!("undefined"),
            "output ran as code on {page}"
        );
        let injected = browser
            .client
            .find_all(Locator::Css("main img, main b"))
            .await
            .unwrap();
        assert!(injected.is_empty(), "output became markup on {page}");
        assert!(browser.text().await.contains("pc-\"><b>bold</b>"));
    }
    assert_eq!(browser.text_of("#out-stdout").await, hostile);
    browser.close().await;

    // The raw download is text, never rendered.
    let (status, head, body) =
        http_get(&ingest, &format!("/runs/{}/stdout.txt", run.result_id)).await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/plain; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains(&format!(
            "content-disposition: attachment; filename=\"{}-stdout.txt\"",
            run.result_id
        )),
        "{head}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert_eq!(body, hostile);
}

#[tokio::test]
async fn every_answer_carries_the_security_headers_and_bad_requests_say_why() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    for path in [
        "/",
        "/manifests",
        "/runs/not-a-uuid",
        "/nowhere",
        "/assets/console.js",
    ] {
        let (_, head, _) = http_get(&ingest, path).await;
        assert!(
            head.contains(
                "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'"
            ) && head.contains("frame-ancestors 'none'")
                && head.contains("x-content-type-options: nosniff"),
            "{path}: {head}"
        );
    }
    let (status, _, body) = http_get(&ingest, "/?state=bogus").await;
    assert_eq!(status, 400);
    assert!(
        body.contains("state=&quot;bogus&quot; is not a state"),
        "{body}"
    );
    let (status, _, body) = http_get(&ingest, "/runs/not-a-uuid").await;
    assert_eq!(status, 400);
    assert!(
        body.contains("is not a run&#39;s result_id") || body.contains("is not a run's result_id"),
        "{body}"
    );
    let (status, _, _) = http_get(&ingest, &format!("/runs/{}", uuid::Uuid::now_v7())).await;
    assert_eq!(status, 404);
    let (status, _, body) = http_get(&ingest, "/manifests?window=2h").await;
    assert_eq!(status, 400);
    assert!(body.contains("window must be 1h, 24h or 7d"), "{body}");
    // The form's empty fields: the same view at its canonical URL.
    let (status, head, _) = http_get(&ingest, "/?state=failed&pc=&manifest=").await;
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("location: /?state=failed"), "{head}");
}

#[tokio::test]
async fn a_run_committed_through_another_replica_appears_without_a_reload() {
    let db = TestDb::postgres().await;
    let shown = TestIngest::start(&db.url).await;
    let other = TestIngest::start(&db.url).await;
    let browser = Browser::start(1280, 800).await;
    browser.client.goto(&shown.console_url()).await.unwrap();
    browser
        .wait_for_text("No runs yet", Duration::from_secs(5))
        .await;
    // The live stream is open before the commit (the header says "live").
    eventually(Duration::from_secs(5), "the live stream open", || async {
        browser.text().await.contains("live")
    })
    .await;
    mark_document(&browser).await;
    let run = Run::new("pc-via-other-replica");
    let committed = tokio::time::Instant::now();
    publish_finished(
        &other,
        &run,
        ExecStatus::Succeeded,
        "hello from the other replica\n",
    )
    .await;
    browser
        .wait_for_text("pc-via-other-replica", Duration::from_secs(2))
        .await;
    let took = committed.elapsed();
    assert!(still_marked(&browser).await, "a live update, not a reload");
    assert!(took < Duration::from_secs(2), "{took:?}");
    browser.close().await;
}

#[tokio::test]
async fn sign_in_takes_a_reader_token_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let reader = add_token(&tokens, &["--reader"]);
    let endpoint = add_token(&tokens, &["pc-1"]);
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--tokens-file", tokens.to_str().unwrap()])
        .start()
        .await;
    // Without a session every page sends to /signin, and the live stream is refused.
    let (status, head, _) = http_get(&ingest, "/runs/x").await;
    assert_eq!(status, 303);
    assert!(
        head.contains("location: /signin?next=%2fruns%2fx"),
        "{head}"
    );
    assert_eq!(http_get(&ingest, "/events").await.0, 401);
    // A link followed from another site comes without the SameSite=Strict cookie: the page
    // loads itself once more, same-site, so a signed-in person gets there.
    let (status, _, body) =
        http_get_with(&ingest, "/runs/x?y=1", "Sec-Fetch-Site: cross-site\r\n").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("content=\"0;url=/runs/x?y=1\""), "{body}");

    let browser = Browser::start(1280, 800).await;
    let client = &browser.client;
    let driven = &browser;
    let sign_in = |token: String| async move {
        let field = client
            .wait()
            .for_element(Locator::Css("input[name=token]"))
            .await
            .unwrap();
        field.send_keys(&token).await.unwrap();
        driven.click("form.signin button[type=submit]").await;
    };
    client
        .goto(&format!("{}/manifests", ingest.console_url()))
        .await
        .unwrap();
    assert_eq!(client.current_url().await.unwrap().path(), "/signin");
    sign_in("not-a-token".into()).await;
    browser
        .wait_for_text(
            "not a token of this ingest's tokens file",
            Duration::from_secs(5),
        )
        .await;
    sign_in(endpoint.clone()).await;
    browser
        .wait_for_text(
            "that is an endpoint's token (pc_id \"pc-1\")",
            Duration::from_secs(5),
        )
        .await;
    assert!(browser.text().await.contains("reader token"));
    sign_in(reader.clone()).await;
    browser
        .wait_for_text("Runs started in the last", Duration::from_secs(5))
        .await;
    assert_eq!(
        client.current_url().await.unwrap().path(),
        "/manifests",
        "back where it was going"
    );

    let cookie = client.get_named_cookie("kanade_session").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    assert_eq!(
        cookie.secure(),
        Some(false),
        "plaintext: a Secure cookie would never be sent"
    );
    assert!(
        cookie.max_age().is_some() || cookie.expires().is_some(),
        "the session expires"
    );
    assert!(
        !cookie.value().contains(&reader) && cookie.value() != reader,
        "no token in the cookie"
    );
    assert!(!ingest.log().contains(&reader), "no token in the log");

    // A cookie opens pages while its session lives.
    let with_cookie = |value: String| {
        let ingest = &ingest;
        async move {
            let cookie = format!("Cookie: kanade_session={value}\r\n");
            http_get_with(ingest, "/", &cookie).await.0
        }
    };
    assert_eq!(with_cookie(cookie.value().to_string()).await, 200);

    // Signing in again replaces the session: the old cookie opens nothing any more.
    client
        .goto(&format!("{}/signin", ingest.console_url()))
        .await
        .unwrap();
    sign_in(reader.clone()).await;
    browser
        .wait_for_text("Activity", Duration::from_secs(5))
        .await;
    let second = client.get_named_cookie("kanade_session").await.unwrap();
    assert_ne!(second.value(), cookie.value());
    assert_eq!(with_cookie(cookie.value().to_string()).await, 303);

    // A typed /signout shows the button (signing out is a POST with the CSRF token); signing
    // out ends the session: its cookie no longer opens a page.
    client
        .goto(&format!("{}/signout", ingest.console_url()))
        .await
        .unwrap();
    browser.click("main form button").await;
    eventually(Duration::from_secs(5), "back at /signin", || async {
        client.current_url().await.unwrap().path() == "/signin"
    })
    .await;
    browser.close().await;
    assert_eq!(with_cookie(second.value().to_string()).await, 303);
}

/// One HTTPS request to the console, trusting `ca`: the raw response.
async fn https_request(
    addr: std::net::SocketAddr,
    ca: &kanade_testkit::TestCa,
    request: &str,
) -> String {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("a TLS handshake with the server's certificate");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn under_tls_the_console_is_https_with_the_same_certificate_and_secure_cookies() {
    let ca = kanade_testkit::TestCa::new("console-ca");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let reader = add_token(&tokens, &["--reader"]);
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .tls(&ca.server("server"))
        .args(&["--tokens-file", tokens.to_str().unwrap()])
        .start()
        .await;
    let addr = ingest.console_addr.unwrap();
    assert_eq!(
        ingest.console_url(),
        format!("https://{addr}"),
        "the printed console line"
    );
    let body = format!("token={reader}&next=%2Fmanifests");
    let answer = https_request(
        addr,
        &ca,
        &format!(
            "POST /signin HTTP/1.1\r\nHost: localhost:{}\r\nOrigin: https://localhost:{}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            addr.port(),
            addr.port(),
            body.len()
        ),
    )
    .await
    .to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 303"), "{answer}");
    assert!(answer.contains("location: /manifests"), "{answer}");
    let cookie = answer
        .lines()
        .find(|l| l.starts_with("set-cookie: kanade_session="))
        .unwrap_or_else(|| panic!("no session cookie: {answer}"));
    for flag in [
        "; httponly",
        "; samesite=strict",
        "; secure",
        "; max-age=43200",
    ] {
        assert!(cookie.contains(flag), "{flag} missing: {cookie}");
    }
    // Plaintext HTTP to the TLS port gets no page.
    let (status, _, _) = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer).await;
        (String::from_utf8_lossy(&answer).contains("200 OK"), (), ())
    }
    .await;
    assert!(!status, "a plaintext page on the TLS console port");
}

#[tokio::test]
async fn a_run_page_links_the_run_s_trace() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--trace-url", "http://jaeger.test:16686/trace/{trace_id}"])
        .start()
        .await;
    let run = Run::new("pc-traced");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    ingest
        .ingest()
        .await
        .publish(pb::Event::from(wire::Event {
            seq: 0,
            body: EventBody::Started(run.started()),
            trace_context: [(
                "traceparent".to_string(),
                format!("00-{trace}-00f067aa0ba902b7-01"),
            )]
            .into(),
        }))
        .await
        .unwrap();
    let (status, _, body) = http_get(&ingest, &format!("/runs/{}", run.result_id)).await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("href=\"http://jaeger.test:16686/trace/{trace}\"")),
        "{body}"
    );
    let untraced = Run::new("pc-traced");
    ingest.publish(EventBody::Started(untraced.started())).await;
    let (_, _, body) = http_get(&ingest, &format!("/runs/{}", untraced.result_id)).await;
    assert!(
        body.contains("none (the agent exported no trace)"),
        "{body}"
    );
}

#[tokio::test]
async fn a_running_run_s_page_shows_its_result_when_it_comes() {
    let db = TestDb::sqlite();
    let ingest = TestIngest::start(&db.url).await;
    let run = Run::new("pc-waiting");
    ingest.publish(EventBody::Started(run.started())).await;
    let browser = Browser::start(1280, 800).await;
    browser
        .client
        .goto(&format!("{}/runs/{}", ingest.console_url(), run.result_id))
        .await
        .unwrap();
    browser
        .wait_for_text("no result yet", Duration::from_secs(5))
        .await;
    eventually(Duration::from_secs(5), "the live stream open", || async {
        browser.text().await.contains("live")
    })
    .await;
    mark_document(&browser).await;
    let mut result = run.result(ExecStatus::Failed, Some(3));
    result.stdout = "finally done\n".into();
    ingest.publish(EventBody::Result(result)).await;
    browser
        .wait_for_text("failed, exit code 3", Duration::from_secs(5))
        .await;
    assert!(still_marked(&browser).await, "updated in place");
    assert_eq!(browser.text_of("#out-stdout").await, "finally done");
    // Final: the page stops following (the "live" badge goes away).
    eventually(
        Duration::from_secs(5),
        "the page no longer live",
        || async {
            !browser
                .client
                .find(Locator::Css("[data-live-status]"))
                .await
                .unwrap()
                .is_displayed()
                .await
                .unwrap()
        },
    )
    .await;
    browser.close().await;
}
