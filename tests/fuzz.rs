//! A proptest-based fuzzer over the path every byte from the network takes: protobuf decoding,
//! then validation into the serde structs. Stable Rust only (no cargo-fuzz here), with a fixed
//! case budget so CI time stays bounded. The property: nothing panics, and whatever validates
//! converts back to the same protobuf.

use kanade_shared::{pb, wire};
use proptest::prelude::*;
use prost::Message;

fn arbitrary_timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    proptest::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

fn arbitrary_started() -> impl Strategy<Value = pb::EventStarted> {
    (
        any::<String>(),
        any::<String>(),
        any::<String>(),
        any::<String>(),
        arbitrary_timestamp(),
        any::<String>(),
        any::<String>(),
        any::<Option<u32>>(),
    )
        .prop_map(
            |(
                result_id,
                request_id,
                exec_id,
                pc_id,
                started_at,
                manifest_id,
                version,
                timeout_secs,
            )| {
                pb::EventStarted {
                    result_id,
                    request_id,
                    exec_id,
                    pc_id,
                    started_at,
                    manifest_id,
                    version,
                    timeout_secs,
                }
            },
        )
}

fn arbitrary_result() -> impl Strategy<Value = pb::ExecResult> {
    (
        arbitrary_started(),
        any::<i32>(),
        any::<Option<i32>>(),
        any::<String>(),
        any::<String>(),
        any::<u64>(),
        any::<u64>(),
        arbitrary_timestamp(),
    )
        .prop_map(
            |(s, status, exit_code, stdout, stderr, out_dropped, err_dropped, finished_at)| {
                pb::ExecResult {
                    result_id: s.result_id,
                    request_id: s.request_id,
                    exec_id: s.exec_id,
                    pc_id: s.pc_id,
                    manifest_id: s.manifest_id,
                    version: s.version,
                    status,
                    exit_code,
                    stdout,
                    stderr,
                    stdout_dropped_bytes: out_dropped,
                    stderr_dropped_bytes: err_dropped,
                    started_at: s.started_at,
                    finished_at,
                }
            },
        )
}

fn arbitrary_event() -> impl Strategy<Value = pb::Event> {
    (
        any::<u64>(),
        proptest::option::of(prop_oneof![
            arbitrary_started().prop_map(pb::event::Body::Started),
            arbitrary_result().prop_map(pb::event::Body::Result),
        ]),
        proptest::collection::hash_map(any::<String>(), any::<String>(), 0..24),
    )
        .prop_map(|(seq, body, trace_context)| pb::Event {
            seq,
            body,
            trace_context,
        })
}

fn check(event: pb::Event) -> Result<(), TestCaseError> {
    if let Ok(valid) = wire::Event::try_from(event) {
        let again = wire::Event::try_from(pb::Event::from(valid.clone()));
        prop_assert_eq!(again, Ok(valid));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_panic_the_wire_path(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(event) = pb::Event::decode(bytes.as_slice()) {
            check(event)?;
        }
        if let Ok(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Event(event)) }) =
            pb::AgentMessage::decode(bytes.as_slice())
        {
            check(event)?;
        }
    }

    #[test]
    fn arbitrary_messages_never_panic_the_wire_path(event in arbitrary_event()) {
        // Through the bytes too, as the network delivers them.
        let decoded = pb::Event::decode(event.encode_to_vec().as_slice()).unwrap();
        check(decoded)?;
        check(event)?;
    }
}
