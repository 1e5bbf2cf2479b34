//! The wire contract: serde and protobuf round trips, the pinned JSON form, and every validation
//! rule of SPEC §2.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use kanade_shared::{
    limits, pb,
    wire::{Event, EventBody, EventStarted, ExecResult, ExecStatus, WireError},
};
use proptest::prelude::*;
use prost::Message;

const MIN_SECONDS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .with_timezone(&Utc)
}

fn started() -> EventStarted {
    EventStarted {
        result_id: "0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01".into(),
        request_id: "req-42".into(),
        exec_id: "5f0e8c9a-1b2c-4d3e-8f70-112233445566".into(),
        pc_id: "pc-0001".into(),
        started_at: at("2026-11-24T09:30:00.123456Z"),
        manifest_id: "disk-cleanup".into(),
        version: "1.4.2".into(),
        timeout_secs: Some(300),
    }
}

fn result() -> ExecResult {
    ExecResult {
        result_id: "0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01".into(),
        request_id: "req-42".into(),
        exec_id: "5f0e8c9a-1b2c-4d3e-8f70-112233445566".into(),
        pc_id: "pc-0001".into(),
        manifest_id: "disk-cleanup".into(),
        version: "1.4.2".into(),
        status: ExecStatus::Failed,
        exit_code: Some(3),
        stdout: "freed 0 bytes\n".into(),
        stderr: "/var/tmp: permission denied\n".into(),
        stdout_dropped_bytes: 0,
        stderr_dropped_bytes: 17,
        started_at: at("2026-11-24T09:30:00.123456Z"),
        finished_at: at("2026-11-24T09:30:02.654321Z"),
    }
}

fn event(body: EventBody) -> Event {
    Event {
        seq: 7,
        body,
        trace_context: BTreeMap::from([(
            "traceparent".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        )]),
    }
}

fn via_proto_bytes(e: Event) -> Result<Event, WireError> {
    let bytes = pb::Event::from(e).encode_to_vec();
    Event::try_from(pb::Event::decode(bytes.as_slice()).unwrap())
}

// ---------------------------------------------------------------- round trips and golden JSON

#[test]
fn json_round_trip_of_every_event() {
    for e in [
        event(EventBody::Started(started())),
        event(EventBody::Result(result())),
    ] {
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
    }
    let s = started();
    assert_eq!(
        serde_json::from_str::<EventStarted>(&serde_json::to_string(&s).unwrap()).unwrap(),
        s
    );
    let r = result();
    assert_eq!(
        serde_json::from_str::<ExecResult>(&serde_json::to_string(&r).unwrap()).unwrap(),
        r
    );
}

#[test]
fn protobuf_round_trip_of_every_event() {
    for e in [
        event(EventBody::Started(started())),
        event(EventBody::Result(result())),
    ] {
        assert_eq!(via_proto_bytes(e.clone()).unwrap(), e);
    }
}

#[test]
fn golden_json_of_event_started_keeps_the_original_seven_fields_in_order() {
    let json = serde_json::to_string_pretty(&started()).unwrap();
    assert_eq!(
        json,
        r#"{
  "result_id": "0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01",
  "request_id": "req-42",
  "exec_id": "5f0e8c9a-1b2c-4d3e-8f70-112233445566",
  "pc_id": "pc-0001",
  "started_at": "2026-11-24T09:30:00.123456Z",
  "manifest_id": "disk-cleanup",
  "version": "1.4.2",
  "timeout_secs": 300
}"#
    );
}

#[test]
fn event_started_json_from_the_original_system_reads_without_timeout() {
    let original = r#"{"result_id":"0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01","request_id":"req-42",
        "exec_id":"5f0e8c9a-1b2c-4d3e-8f70-112233445566","pc_id":"pc-0001",
        "started_at":"2026-11-24T09:30:00.123456Z","manifest_id":"disk-cleanup","version":"1.4.2"}"#;
    let parsed: EventStarted = serde_json::from_str(original).unwrap();
    assert_eq!(
        parsed,
        EventStarted {
            timeout_secs: None,
            ..started()
        }
    );
}

#[test]
fn golden_json_of_exec_result() {
    let json = serde_json::to_string_pretty(&result()).unwrap();
    assert_eq!(
        json,
        r#"{
  "result_id": "0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01",
  "request_id": "req-42",
  "exec_id": "5f0e8c9a-1b2c-4d3e-8f70-112233445566",
  "pc_id": "pc-0001",
  "manifest_id": "disk-cleanup",
  "version": "1.4.2",
  "status": "failed",
  "exit_code": 3,
  "stdout": "freed 0 bytes\n",
  "stderr": "/var/tmp: permission denied\n",
  "stdout_dropped_bytes": 0,
  "stderr_dropped_bytes": 17,
  "started_at": "2026-11-24T09:30:00.123456Z",
  "finished_at": "2026-11-24T09:30:02.654321Z"
}"#
    );
}

#[test]
fn golden_json_of_exec_status() {
    let names: Vec<String> = ExecStatus::ALL
        .iter()
        .map(|s| serde_json::to_string(s).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            r#""succeeded""#,
            r#""failed""#,
            r#""timed_out""#,
            r#""killed""#,
            r#""spawn_failed""#,
            r#""interrupted""#,
            r#""cancelled""#
        ]
    );
    for s in ExecStatus::ALL {
        assert_eq!(ExecStatus::from_name(s.as_str()), Some(s));
    }
}

#[test]
fn golden_json_of_event() {
    let json = serde_json::to_string(&event(EventBody::Started(EventStarted {
        timeout_secs: None,
        ..started()
    })))
    .unwrap();
    assert_eq!(
        json,
        r#"{"seq":7,"body":{"started":{"result_id":"0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01","request_id":"req-42","exec_id":"5f0e8c9a-1b2c-4d3e-8f70-112233445566","pc_id":"pc-0001","started_at":"2026-11-24T09:30:00.123456Z","manifest_id":"disk-cleanup","version":"1.4.2","timeout_secs":null}},"trace_context":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}"#
    );
}

// ---------------------------------------------------------------- normalisation

#[test]
fn result_id_is_normalised_to_lowercase_hyphenated() {
    let mut s = pb::EventStarted::from(started());
    s.result_id = "0192F0C45B1E7CC29A403F1D2B8E6A01".into();
    assert_eq!(
        EventStarted::try_from(s).unwrap().result_id,
        "0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01"
    );
    // Hyphenated, but uppercase: as long as the normal form, and still not it.
    let mut s = pb::EventStarted::from(started());
    s.result_id = "0192F0C4-5B1E-7CC2-9A40-3F1D2B8E6A01".into();
    assert_eq!(
        EventStarted::try_from(s).unwrap().result_id,
        "0192f0c4-5b1e-7cc2-9a40-3f1d2b8e6a01"
    );
}

#[test]
fn timestamps_are_truncated_to_microseconds() {
    let mut s = pb::EventStarted::from(started());
    s.started_at = Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 123_456_789,
    });
    assert_eq!(
        EventStarted::try_from(s).unwrap().started_at,
        Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap()
    );
}

// ---------------------------------------------------------------- one test per validation error

fn started_with(edit: impl FnOnce(&mut pb::EventStarted)) -> Result<EventStarted, WireError> {
    let mut s = pb::EventStarted::from(started());
    edit(&mut s);
    EventStarted::try_from(s)
}

fn result_with(edit: impl FnOnce(&mut pb::ExecResult)) -> Result<ExecResult, WireError> {
    let mut r = pb::ExecResult::from(result());
    edit(&mut r);
    ExecResult::try_from(r)
}

#[test]
fn result_id_that_is_not_a_uuid_is_refused() {
    let err = started_with(|s| s.result_id = "run-17".into()).unwrap_err();
    assert_eq!(
        err,
        WireError::NotAUuid {
            field: "result_id",
            value: "run-17".into()
        }
    );
    assert_eq!(err.to_string(), r#"result_id must be a UUID, got "run-17""#);
}

#[test]
fn empty_required_strings_are_refused() {
    for field in ["result_id", "request_id", "exec_id", "pc_id", "manifest_id"] {
        let err = result_with(|r| match field {
            "result_id" => r.result_id.clear(),
            "request_id" => r.request_id.clear(),
            "exec_id" => r.exec_id.clear(),
            "pc_id" => r.pc_id.clear(),
            _ => r.manifest_id.clear(),
        })
        .unwrap_err();
        assert_eq!(err, WireError::Empty { field });
        assert_eq!(err.to_string(), format!("{field} must not be empty"));
    }
}

#[test]
fn empty_version_is_allowed() {
    assert_eq!(started_with(|s| s.version.clear()).unwrap().version, "");
}

#[test]
fn ids_longer_than_128_bytes_are_refused() {
    let err = started_with(|s| s.pc_id = "é".repeat(65)).unwrap_err();
    assert_eq!(
        err,
        WireError::TooLong {
            field: "pc_id",
            len: 130,
            max: limits::MAX_ID_BYTES
        }
    );
    assert!(started_with(|s| s.pc_id = "p".repeat(128)).is_ok());
}

#[test]
fn missing_timestamp_is_refused() {
    let err = started_with(|s| s.started_at = None).unwrap_err();
    assert_eq!(
        err,
        WireError::Missing {
            field: "started_at"
        }
    );
    let err = result_with(|r| r.finished_at = None).unwrap_err();
    assert_eq!(
        err,
        WireError::Missing {
            field: "finished_at"
        }
    );
}

#[test]
fn timestamps_outside_years_0001_to_9999_are_refused() {
    for (seconds, nanos) in [
        (MIN_SECONDS - 1, 0),
        (MAX_SECONDS + 1, 0),
        (0, -1),
        (0, 1_000_000_000),
    ] {
        let err = started_with(|s| s.started_at = Some(prost_types::Timestamp { seconds, nanos }))
            .unwrap_err();
        assert_eq!(
            err,
            WireError::TimestampOutOfRange {
                field: "started_at",
                seconds,
                nanos
            }
        );
    }
}

#[test]
fn finished_before_started_is_refused() {
    let err = result_with(|r| {
        r.finished_at = Some(prost_types::Timestamp {
            seconds: r.started_at.unwrap().seconds - 1,
            nanos: 0,
        })
    })
    .unwrap_err();
    assert!(matches!(err, WireError::FinishedBeforeStarted { .. }));
    assert_eq!(err.field(), "finished_at");
}

#[test]
fn unknown_status_is_refused() {
    let err = result_with(|r| r.status = 42).unwrap_err();
    assert_eq!(
        err,
        WireError::UnknownEnumValue {
            field: "status",
            value: 42
        }
    );
}

#[test]
fn unspecified_status_is_refused() {
    let err = result_with(|r| r.status = pb::ExecStatus::Unspecified as i32).unwrap_err();
    assert_eq!(err, WireError::Unspecified { field: "status" });
}

#[test]
fn event_without_body_is_refused() {
    let mut e = pb::Event::from(event(EventBody::Started(started())));
    e.body = None;
    assert_eq!(
        Event::try_from(e).unwrap_err(),
        WireError::Missing { field: "body" }
    );
}

#[test]
fn oversized_trace_context_is_refused() {
    let mut e = pb::Event::from(event(EventBody::Started(started())));
    e.trace_context = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(
        Event::try_from(e.clone()).unwrap_err(),
        WireError::TooManyEntries {
            field: "trace_context",
            count: 17,
            max: 16
        }
    );
    e.trace_context = [("traceparent".to_string(), "x".repeat(257))].into();
    assert_eq!(
        Event::try_from(e).unwrap_err(),
        WireError::TooLong {
            field: "trace_context",
            len: 257,
            max: 256
        }
    );
}

// ---------------------------------------------------------------- properties

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    let seconds = prop_oneof![
        1 => Just(MIN_SECONDS),
        1 => Just(MAX_SECONDS),
        8 => MIN_SECONDS..=MAX_SECONDS,
    ];
    let micros = prop_oneof![1 => Just(0u32), 1 => Just(999_999u32), 8 => 0u32..1_000_000];
    (seconds, micros).prop_map(|(s, us)| Utc.timestamp_opt(s, us * 1_000).unwrap())
}

fn uuid_string() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string())
}

/// A non-empty id of at most 128 bytes: any Unicode, including the 128-byte edge.
fn required_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{1,32}",
        1 => any::<String>().prop_filter("non-empty, ≤ 128 bytes", |s| !s.is_empty() && s.len() <= 128),
        1 => Just("x".repeat(128)),
    ]
}

fn optional_id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), required_id()]
}

/// Outputs: empty, any Unicode including NUL and control characters, and very long.
fn output() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        4 => any::<String>(),
        1 => ("\\PC", 0usize..300_000).prop_map(|(c, n)| c.repeat(n)),
    ]
}

prop_compose! {
    fn arb_started()(
        result_id in uuid_string(), request_id in required_id(), exec_id in required_id(),
        pc_id in required_id(), started_at in timestamp(), manifest_id in required_id(),
        version in optional_id(), timeout_secs in any::<Option<u32>>(),
    ) -> EventStarted {
        EventStarted { result_id, request_id, exec_id, pc_id, started_at, manifest_id, version, timeout_secs }
    }
}

prop_compose! {
    fn arb_result()(
        started in arb_started(),
        status in proptest::sample::select(ExecStatus::ALL.to_vec()),
        exit_code in any::<Option<i32>>(),
        stdout in output(), stderr in output(),
        stdout_dropped_bytes in any::<u64>(), stderr_dropped_bytes in any::<u64>(),
        finished_at in timestamp(),
    ) -> ExecResult {
        let (started_at, finished_at) = if finished_at < started.started_at {
            (finished_at, started.started_at)
        } else {
            (started.started_at, finished_at)
        };
        ExecResult {
            result_id: started.result_id, request_id: started.request_id,
            exec_id: started.exec_id, pc_id: started.pc_id, manifest_id: started.manifest_id,
            version: started.version, status, exit_code, stdout, stderr,
            stdout_dropped_bytes, stderr_dropped_bytes, started_at, finished_at,
        }
    }
}

fn arb_trace_context() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map("\\PC{0,64}", "\\PC{0,64}", 0..=16)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn event_started_survives_serde_to_proto_to_serde(s in arb_started()) {
        let back = EventStarted::try_from(pb::EventStarted::from(s.clone()));
        prop_assert_eq!(back, Ok(s));
    }

    #[test]
    fn exec_result_survives_serde_to_proto_to_serde(r in arb_result()) {
        let back = ExecResult::try_from(pb::ExecResult::from(r.clone()));
        prop_assert_eq!(back, Ok(r));
    }

    #[test]
    fn event_survives_protobuf_bytes_and_json(
        seq in any::<u64>(),
        body in prop_oneof![arb_started().prop_map(EventBody::Started), arb_result().prop_map(EventBody::Result)],
        trace_context in arb_trace_context(),
    ) {
        let e = Event { seq, body, trace_context };
        prop_assert_eq!(via_proto_bytes(e.clone()), Ok(e.clone()));
        let json = serde_json::to_string(&e).unwrap();
        prop_assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
    }
}

/// One kind of invalid value, applied to an otherwise valid result.
#[derive(Debug, Clone)]
enum Breakage {
    NotAUuid(String),
    EmptyPcId,
    LongExecId(usize),
    MissingStartedAt,
    TimestampTooLate(i64),
    FinishedBefore(i64),
    UnknownStatus(i32),
    UnspecifiedStatus,
}

fn breakage() -> impl Strategy<Value = Breakage> {
    prop_oneof![
        "[g-z]{1,40}".prop_map(Breakage::NotAUuid),
        Just(Breakage::EmptyPcId),
        (129usize..4096).prop_map(Breakage::LongExecId),
        Just(Breakage::MissingStartedAt),
        (MAX_SECONDS + 1..i64::MAX).prop_map(Breakage::TimestampTooLate),
        (1i64..1_000_000_000).prop_map(Breakage::FinishedBefore),
        (7i32..i32::MAX).prop_map(Breakage::UnknownStatus),
        Just(Breakage::UnspecifiedStatus),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn each_kind_of_invalid_value_yields_its_typed_error(r in arb_result(), b in breakage()) {
        let mut p = pb::ExecResult::from(r);
        let expected_field = match &b {
            Breakage::NotAUuid(v) => { p.result_id = v.clone(); "result_id" }
            Breakage::EmptyPcId => { p.pc_id.clear(); "pc_id" }
            Breakage::LongExecId(n) => { p.exec_id = "e".repeat(*n); "exec_id" }
            Breakage::MissingStartedAt => { p.started_at = None; "started_at" }
            Breakage::TimestampTooLate(s) => {
                p.finished_at = Some(prost_types::Timestamp { seconds: *s, nanos: 0 });
                "finished_at"
            }
            Breakage::FinishedBefore(d) => {
                let start = p.started_at.unwrap();
                let seconds = (start.seconds - d).max(MIN_SECONDS);
                prop_assume!(seconds < start.seconds);
                p.finished_at = Some(prost_types::Timestamp { seconds, nanos: 0 });
                "finished_at"
            }
            Breakage::UnknownStatus(v) => { p.status = *v; "status" }
            Breakage::UnspecifiedStatus => { p.status = 0; "status" }
        };
        let err = ExecResult::try_from(p).unwrap_err();
        prop_assert_eq!(err.field(), expected_field);
        let kind_matches = match (&b, &err) {
            (Breakage::NotAUuid(v), WireError::NotAUuid { value, .. }) => v == value,
            (Breakage::EmptyPcId, WireError::Empty { .. }) => true,
            (Breakage::LongExecId(n), WireError::TooLong { len, .. }) => n == len,
            (Breakage::MissingStartedAt, WireError::Missing { .. }) => true,
            (Breakage::TimestampTooLate(_), WireError::TimestampOutOfRange { .. }) => true,
            (Breakage::FinishedBefore(_), WireError::FinishedBeforeStarted { .. }) => true,
            (Breakage::UnknownStatus(v), WireError::UnknownEnumValue { value, .. }) => v == value,
            (Breakage::UnspecifiedStatus, WireError::Unspecified { .. }) => true,
            _ => false,
        };
        prop_assert!(kind_matches, "{:?} gave {:?}", b, err);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The agent validates what it creates with the same rules ingest applies on decoding: every
    /// breakage a serde value can hold is refused by `validate()` with exactly the error the
    /// protobuf path gives, and a valid value passes both.
    #[test]
    fn validate_on_serde_values_agrees_with_decoding(r in arb_result(), b in breakage()) {
        prop_assert_eq!(r.validate(), Ok(()));
        let mut broken = r;
        match &b {
            Breakage::NotAUuid(v) => broken.result_id = v.clone(),
            Breakage::EmptyPcId => broken.pc_id.clear(),
            Breakage::LongExecId(n) => broken.exec_id = "e".repeat(*n),
            Breakage::FinishedBefore(d) => {
                let before = broken.started_at - chrono::Duration::seconds(*d);
                prop_assume!(before.timestamp() >= MIN_SECONDS);
                broken.finished_at = before;
            }
            // Absent timestamps and unknown enum values exist only on the wire.
            _ => return Ok(()),
        }
        let decoded = ExecResult::try_from(pb::ExecResult::from(broken.clone())).unwrap_err();
        prop_assert_eq!(broken.validate().unwrap_err(), decoded);
    }
}

#[test]
fn validate_refuses_what_the_agent_could_build_wrong() {
    let mut s = started();
    s.manifest_id = "m".repeat(129);
    assert_eq!(
        s.validate().unwrap_err(),
        WireError::TooLong {
            field: "manifest_id",
            len: 129,
            max: 128
        }
    );
    let mut s = started();
    s.request_id = format!("schedule:{}", "m".repeat(120));
    assert_eq!(s.validate().unwrap_err().field(), "request_id");
    let mut s = started();
    s.started_at = DateTime::from_timestamp(MAX_SECONDS + 1, 0).unwrap();
    assert!(matches!(
        s.validate().unwrap_err(),
        WireError::TimestampOutOfRange {
            field: "started_at",
            ..
        }
    ));
    let mut e = event(EventBody::Started(started()));
    e.trace_context = (0..17).map(|i| (i.to_string(), String::new())).collect();
    assert!(matches!(
        e.validate().unwrap_err(),
        WireError::TooManyEntries { count: 17, .. }
    ));
}
