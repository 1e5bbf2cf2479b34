//! TLS and mTLS with certificates generated per test (rcgen): a client certificate writes as
//! itself and nobody else; a rogue CA, a missing certificate, plaintext and a silent client get
//! nowhere and leave the server serving; certificates rotate without a restart.

use std::time::Duration;

use kanade_shared::pb::{self, ingest_client::IngestClient};
use tokio::io::AsyncReadExt;
use tonic::{Code, Request, transport::Channel};

use kanade_testkit::{
    AgentStream, Run, TestCa, TestDb, TestIngest, eventually, hello, tls_channel,
};

async fn publish(channel: Channel, event: pb::Event) -> Result<(), tonic::Status> {
    IngestClient::new(channel)
        .publish(Request::new(event))
        .await
        .map(drop)
}

#[tokio::test]
async fn an_mtls_client_writes_as_itself_and_never_as_another_pc() {
    let ca = TestCa::new("kanade test CA");
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url).mtls(&ca).start().await;
    let store = db.store().await;

    for (pc, in_cn_only) in [("pc-dns", false), ("pc-cn", true)] {
        let cert = ca.client(pc, in_cn_only);
        let channel = tls_channel(ingest.addr, &ca, Some(&cert)).await.unwrap();

        // As itself: Publish and a stream both commit.
        let own = Run::new(pc);
        publish(channel.clone(), own.started_event(0))
            .await
            .unwrap_or_else(|s| panic!("{pc} publishing its own run: {s}"));
        let mut client = IngestClient::new(channel.clone());
        let mut stream = AgentStream::open(&mut client, pc).await;
        stream.send(own.result_event(1)).await;
        // As another pc inside its own stream: rejected, the stream carries on.
        stream.send(Run::new("pc-other").started_event(2)).await;
        let (acked, rejected) = stream.answers(2).await;
        assert_eq!(acked, [1], "{pc}");
        assert_eq!(rejected.len(), 1, "{pc}");
        assert!(rejected[0].1.contains("pc-other"), "{rejected:?}");
        let row = own.stored_in(&*store).await.expect("own row");
        assert!(row.outcome.is_some(), "{pc}: started and result coalesced");

        // As another pc: Publish and Hello are refused.
        let foreign = publish(channel.clone(), Run::new("pc-other").started_event(3))
            .await
            .unwrap_err();
        assert_eq!(foreign.code(), Code::PermissionDenied, "{foreign}");
        let refused = AgentStream::open_with(&mut client, Some(hello("pc-other")))
            .await
            .err()
            .expect("a Hello for another pc is refused");
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(refused.message().contains(pc), "{refused}");

        // A certificate identifies an endpoint, which may not read every endpoint's outputs.
        let read = pb::activity_client::ActivityClient::new(channel)
            .list_executions(pb::ListExecutionsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(read.code(), Code::PermissionDenied);
        assert!(read.message().contains("reader token"), "{read}");
    }
    let all = store
        .list(&kanade_ingest::store::ListQuery::all(
            kanade_testkit::now(),
            chrono::Duration::minutes(5),
            100,
        ))
        .await
        .unwrap();
    assert_eq!(all.len(), 2, "only each client's own run was written");
    assert!(all.iter().all(|r| r.pc_id != "pc-other"));
}

/// Publishing `run` over `channel` fails (at connecting or at the call).
async fn refusal(channel: Result<Channel, tonic::transport::Error>, run: &Run) {
    if let Ok(channel) = channel {
        let answer = publish(channel, run.started_event(0)).await;
        assert!(answer.is_err(), "the call went through");
    }
}

#[tokio::test]
async fn rogue_certificates_missing_certificates_plaintext_and_silence_get_nowhere() {
    let ca = TestCa::new("kanade test CA");
    let rogue_ca = TestCa::new("rogue CA");
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .mtls(&ca)
        .args(&["--hello-timeout", "500ms"])
        .start()
        .await;
    let run = Run::new("pc-a");

    // A certificate for the right name from another CA. With TLS 1.3 the client may finish
    // its side of the handshake before the server refuses, so the call is what must fail, and
    // with the server's reason.
    let rogue = rogue_ca.client("pc-a", false);
    refusal(tls_channel(ingest.addr, &ca, Some(&rogue)).await, &run).await;
    // No certificate at all.
    refusal(tls_channel(ingest.addr, &ca, None).await, &run).await;
    // Plaintext to the TLS port.
    refusal(
        Channel::from_shared(ingest.url()).unwrap().connect().await,
        &run,
    )
    .await;
    // A client that connects and never says anything is dropped after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(ingest.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("a silent connection is closed within the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Nothing of that was written, and a legitimate client is still served.
    let store = db.store().await;
    assert!(run.stored_in(&*store).await.is_none());
    let good = ca.client("pc-a", false);
    let channel = tls_channel(ingest.addr, &ca, Some(&good)).await.unwrap();
    publish(channel, run.started_event(0)).await.unwrap();
    assert!(run.stored_in(&*store).await.is_some());
    // The server refused each for its own reason.
    let log = ingest.log();
    for reason in [
        "invalid peer certificate: UnknownIssuer",
        "peer sent no certificates",
        "InvalidContentType", // an HTTP/2 preface is not a TLS record
    ] {
        assert!(log.contains(reason), "{reason}: {log}");
    }
    assert!(log.contains("not completed in time"), "{log}");
}

#[tokio::test]
async fn certificates_rotate_without_a_restart_and_tokens_work_over_tls() {
    let old_ca = TestCa::new("old CA");
    let new_ca = TestCa::new("new CA");
    let serving = old_ca.server("serving");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let token = kanade_ingest::auth::add_token(
        &tokens,
        &kanade_ingest::auth::NewToken::Agent {
            pc_id: "pc-a".into(),
        },
    )
    .unwrap();
    let db = TestDb::sqlite();
    let ingest = TestIngest::builder(&db.url)
        .tls(&serving)
        .args(&[
            "--tls-reload-every",
            "100ms",
            "--tokens-file",
            tokens.to_str().unwrap(),
        ])
        .start()
        .await;
    let with_token = |event: pb::Event| {
        let mut request = Request::new(event);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };

    // Tokens over TLS: required and honoured.
    let channel = tls_channel(ingest.addr, &old_ca, None).await.unwrap();
    let mut client = IngestClient::new(channel);
    let missing = client
        .publish(Request::new(Run::new("pc-a").started_event(0)))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    client
        .publish(with_token(Run::new("pc-a").started_event(0)))
        .await
        .unwrap();
    assert!(
        tls_channel(ingest.addr, &new_ca, None).await.is_err(),
        "the new CA does not trust the old certificate yet"
    );

    // An unusable replacement is reported and the old certificate keeps serving.
    std::fs::write(&serving.cert, "not a certificate").unwrap();
    eventually(Duration::from_secs(10), "the bad file reported", || async {
        ingest.log().contains("cannot be used")
    })
    .await;
    client
        .publish(with_token(Run::new("pc-a").started_event(0)))
        .await
        .expect("the open connection still serves");
    tls_channel(ingest.addr, &old_ca, None)
        .await
        .expect("new connections still get the old certificate");

    // The rotation: new connections get the new certificate.
    new_ca.server("rotated").install_over(&serving);
    let mut rotated = None;
    for _ in 0..100 {
        if let Ok(channel) = tls_channel(ingest.addr, &new_ca, None).await {
            rotated = Some(channel);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = rotated.expect("the rotated certificate is served within 10 s");
    IngestClient::new(rotated)
        .publish(with_token(Run::new("pc-a").started_event(0)))
        .await
        .unwrap();
    assert!(tls_channel(ingest.addr, &old_ca, None).await.is_err());
    // A connection opened before the rotation is not disturbed by it.
    client
        .publish(with_token(Run::new("pc-a").started_event(0)))
        .await
        .unwrap();
}
