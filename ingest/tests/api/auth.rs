//! Bearer tokens: `token add`, and what each kind of caller may do.

use std::{io::Write, time::Duration};

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
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello("pc-a")).await.unwrap();
    tx.send(kanade_testkit::event_msg(Run::new("pc-a").started_event(1)))
        .await
        .unwrap();
    let mut own = AgentStream {
        tx,
        rx: client
            .stream(with_token(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                &pc_a,
            ))
            .await
            .unwrap()
            .into_inner(),
    };
    assert!(matches!(
        own.next().await,
        Some(pb::ingest_message::Msg::Welcome(_))
    ));
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
    let added = std::fs::read_to_string(&tokens).unwrap();
    eventually(Duration::from_secs(5), "the new reader token works", || {
        let list = list(reader.clone());
        async move { list.await.is_ok() }
    })
    .await;

    // Removed: refused within a few checks.
    let without_reader: String = added
        .split("\n[[token]]")
        .filter(|entry| !entry.contains(&kanade_ingest::auth::sha256_hex(&reader)))
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
    ingest
        .ingest()
        .await
        .publish(with_token(Run::new("pc-a").started_event(1), &pc_a))
        .await
        .expect("the tokens left still work");
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
