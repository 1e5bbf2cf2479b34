//! Bearer tokens: `token add`, and what each kind of caller may do.

use std::{io::Write, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use kanade_shared::pb;
use tonic::{Code, Request, metadata::MetadataValue};

use kanade_testkit::{
    AgentHome, AgentStream, Run, SERVING, TestDb, TestIngest, add_token, eventually, health, hello,
};

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

#[tokio::test]
async fn tokens_bind_writers_to_their_pc_and_readers_to_activity() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let pc_a = add_token(&tokens, &["pc-a"]);
    let reader = add_token(&tokens, &["--reader"]);
    let stored = std::fs::read_to_string(&tokens).unwrap();
    assert!(
        !stored.contains(&pc_a) && !stored.contains(&reader),
        "tokens are stored hashed"
    );

    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .args(&["--tokens-file", tokens.to_str().unwrap()])
        .start()
        .await;
    let mut client = ingest.ingest().await;

    // Publish: valid, missing, unknown, another pc's run, a reader's token.
    let run = Run::new("pc-a");
    client
        .publish(with_token(run.started_event(0), &pc_a))
        .await
        .expect("its own run");
    let missing = client
        .publish(Request::new(run.result_event(0)))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    let unknown = client
        .publish(with_token(run.result_event(0), "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    let other = client
        .publish(with_token(Run::new("pc-b").started_event(0), &pc_a))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let by_reader = client
        .publish(with_token(run.result_event(0), &reader))
        .await
        .unwrap_err();
    assert_eq!(by_reader.code(), Code::PermissionDenied);

    // Streams: the Hello must name the token's pc.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello("pc-b")).await.unwrap();
    let foreign = client
        .stream(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &pc_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::PermissionDenied);
    let mut own = open_stream(&ingest, "pc-a", &pc_a).await;
    own.send(Run::new("pc-a").started_event(1)).await;
    assert_eq!(own.answers(1).await.0, [1]);

    // Activity: readers only.
    let mut activity = ingest.activity().await;
    let listed = activity
        .list_executions(with_token(pb::ListExecutionsRequest::default(), &reader))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.executions.len(), 2);
    let as_writer = activity
        .list_executions(with_token(pb::ListExecutionsRequest::default(), &pc_a))
        .await
        .unwrap_err();
    assert_eq!(as_writer.code(), Code::PermissionDenied);
    let anonymous = activity
        .list_executions(Request::new(pb::ListExecutionsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // Health needs no token.
    assert_eq!(health(ingest.addr, "").await, SERVING);
}

/// Ingest requiring the tokens of `tokens`, which it rereads every 100 ms.
async fn rereading_tokens(db: &TestDb, tokens: &std::path::Path) -> TestIngest {
    TestIngest::builder(&db.url)
        .args(&[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--tokens-reload-every",
            "100ms",
        ])
        .start()
        .await
}

#[tokio::test]
async fn tokens_added_or_removed_apply_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let pc_a = add_token(&tokens, &["pc-a"]);
    let pc_b = add_token(&tokens, &["pc-b"]);
    let db = TestDb::sqlite();
    let ingest = rereading_tokens(&db, &tokens).await;
    let list = |token: String| {
        let ingest = &ingest;
        async move {
            ingest
                .activity()
                .await
                .list_executions(with_token(pb::ListExecutionsRequest::default(), &token))
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };

    // Added while ingest runs: honoured within a few checks.
    let reader = add_token(&tokens, &["--reader"]);
    eventually(Duration::from_secs(5), "the new reader token works", || {
        let list = list(reader.clone());
        async move { list.await.is_ok() }
    })
    .await;

    // Removed: refused within a few checks.
    // What the reader and pc-b hold open when their tokens go: a live tail of a running run and
    // an agent stream.
    let run = Run::new("pc-a");
    ingest
        .ingest()
        .await
        .publish(with_token(run.started_event(0), &pc_a))
        .await
        .unwrap();
    let mut tail = ingest
        .control()
        .await
        .tail_execution(with_token(
            pb::TailExecutionRequest {
                result_id: run.result_id.clone(),
            },
            &reader,
        ))
        .await
        .unwrap()
        .into_inner();
    let added = std::fs::read_to_string(&tokens).unwrap();
    let mut agent = open_stream(&ingest, "pc-b", &pc_b).await;
    let mut live_page = console_events(&ingest, &reader).await;

    let withdrawn = [
        kanade_ingest::auth::sha256_hex(&reader),
        kanade_ingest::auth::sha256_hex(&pc_b),
    ];
    let without_reader: String = added
        .split("\n[[token]]")
        .filter(|entry| !withdrawn.iter().any(|hash| entry.contains(hash)))
        .collect::<Vec<_>>()
        .join("\n[[token]]");
    // Replaced whole, as an editor or a Secret update does (a half-written file is covered by
    // the unit tests).
    let replacement = dir.path().join("tokens.toml.new");
    std::fs::write(&replacement, without_reader).unwrap();
    std::fs::rename(&replacement, &tokens).unwrap();
    eventually(
        Duration::from_secs(5),
        "the removed token is refused",
        || {
            let list = list(reader.clone());
            async move { list.await == Err(Code::Unauthenticated) }
        },
    )
    .await;
    // What they held open ends, saying why.
    let within = Duration::from_secs(5);
    let tail_end = tokio::time::timeout(within, async {
        loop {
            match tail.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the tail ends");
    let status = tail_end.expect_err("ends with an error");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("removed"), "{status:?}");
    let agent_end = tokio::time::timeout(within, async {
        loop {
            match agent.rx.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the agent's stream ends");
    assert_eq!(
        agent_end.expect_err("ends with an error").code(),
        Code::Unauthenticated
    );
    let mut rest = Vec::new();
    tokio::time::timeout(within, live_page.read_to_end(&mut rest))
        .await
        .expect("the console page's live updates end")
        .unwrap();
    ingest
        .ingest()
        .await
        .publish(with_token(Run::new("pc-a").started_event(1), &pc_a))
        .await
        .expect("the tokens left still work");
}

/// The console's live updates (`/events`) for a session signed in with `token`, past the
/// response head.
async fn console_events(ingest: &TestIngest, token: &str) -> tokio::net::TcpStream {
    let addr = ingest.console_addr.expect("a console");
    let body = format!("token={token}&next=%2F");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST /signin HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
             application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("signed in: {answer}"))
        .to_string();
    let mut events = tokio::net::TcpStream::connect(addr).await.unwrap();
    events
        .write_all(
            format!("GET /events HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        events.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    events
}

/// An agent stream for `pc_id` with `token`, past its Welcome.
async fn open_stream(ingest: &TestIngest, pc_id: &str, token: &str) -> AgentStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(pc_id)).await.unwrap();
    let mut stream = AgentStream {
        tx,
        rx: ingest
            .ingest()
            .await
            .stream(with_token(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                token,
            ))
            .await
            .unwrap()
            .into_inner(),
    };
    assert!(matches!(
        stream.next().await,
        Some(pb::ingest_message::Msg::Welcome(_))
    ));
    stream
}

#[tokio::test]
async fn an_agent_refused_for_its_token_says_what_to_do_and_gets_through_once_it_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let reader = add_token(&tokens, &["--reader"]);
    let db = TestDb::sqlite();
    let ingest = rereading_tokens(&db, &tokens).await;

    // No token at all: the agent's log says how to make one and where it goes.
    let tokenless = AgentHome::named("pc-bare", &ingest.url(), "");
    let bare = tokenless.daemon();
    // A token ingest does not know (yet).
    let token = uuid::Uuid::new_v4().simple().to_string();
    let token_file = dir.path().join("pc-late.token");
    std::fs::write(&token_file, &token).unwrap();
    let home = AgentHome::named(
        "pc-late",
        &ingest.url(),
        &format!("token_file = {:?}\n", token_file.to_str().unwrap()),
    );
    let late = home.daemon();
    let out = home.exec(&["--exec-id", "after-the-token"], "hello", &["true"]);
    assert!(out.status.success(), "{out:?}");
    eventually(Duration::from_secs(10), "both agents say why", || {
        let (bare, late) = (bare.log(), late.log());
        async move {
            bare.contains("ingest requires a token")
                && bare.contains("kanade-ingest token add pc-bare")
                && late.contains("ingest does not know this agent's token")
                && late.contains("kanade-ingest token add pc-late")
        }
    })
    .await;
    assert!(
        !late.log().contains(&token),
        "the agent never logs its token"
    );

    // The token is added to ingest's file: the waiting run arrives, no restart of either side.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&tokens)
        .unwrap();
    writeln!(
        file,
        "\n[[token]]\nsha256 = \"{}\"\npc_id = \"pc-late\"",
        kanade_ingest::auth::sha256_hex(&token)
    )
    .unwrap();
    let reader = &reader;
    let ingest = &ingest;
    eventually(
        Duration::from_secs(10),
        "the run is stored",
        || async move {
            ingest
                .activity()
                .await
                .list_executions(with_token(
                    pb::ListExecutionsRequest {
                        exec_id: "after-the-token".into(),
                        ..Default::default()
                    },
                    reader,
                ))
                .await
                .is_ok_and(|listed| listed.into_inner().executions.len() == 1)
        },
    )
    .await;
}
