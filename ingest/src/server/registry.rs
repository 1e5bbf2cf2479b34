//! The open agent streams of this replica, by endpoint: what `--max-streams` and
//! `--max-streams-per-pc` count, how ingest reaches an endpoint's stream to send it something
//! that is not an answer to one of its events (a cancel), and what [`crate::presence`] is told
//! when a stream opens and closes.
//!
//! A stream takes a [`Registration`] when it opens (counted in the total) and claims its `pc_id`
//! with its sink on `Hello`. The registration lives until both halves of the stream are gone —
//! the handler reading it and the response stream writing it — so a client that never reads
//! holds its place, and the memory behind it, within the per-pc limit. The registry keeps only
//! weak references to sinks: it never keeps a stream's outbound queue open by itself.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
};

use crate::{
    metrics::Metrics,
    outbound::StreamSink,
    presence::{Presence, StreamInfo},
};

/// Why a stream may not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "this ingest replica already serves {max} streams (--max-streams); retry later or on \
         another replica"
    )]
    ReplicaFull { max: usize },
    #[error(
        "pc_id {pc_id:?} already has {max} open streams (--max-streams-per-pc); close the others \
         or check for two agents configured with the same pc_id"
    )]
    EndpointFull { pc_id: String, max: usize },
}

/// Limits on open streams.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    pub max_streams: usize,
    pub max_streams_per_pc: usize,
}

/// One stream that said Hello.
#[derive(Debug)]
struct Entry {
    id: u64,
    sink: Weak<StreamSink>,
    info: StreamInfo,
}

#[derive(Debug, Default)]
struct Streams {
    total: usize,
    next_id: u64,
    by_pc: HashMap<String, Vec<Entry>>,
}

/// Every open stream of this replica.
#[derive(Debug)]
pub struct StreamRegistry {
    streams: Mutex<Streams>,
    limits: RegistryLimits,
    metrics: Arc<Metrics>,
    presence: Presence,
}

/// One stream's place in the registry; dropping it gives the place back.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<StreamRegistry>,
    id: u64,
    /// The stream's endpoint, once it said Hello.
    stream: Option<StreamInfo>,
}

impl StreamRegistry {
    pub fn new(
        limits: RegistryLimits,
        metrics: Arc<Metrics>,
        presence: Presence,
    ) -> Arc<StreamRegistry> {
        Arc::new(StreamRegistry {
            streams: Mutex::default(),
            limits,
            metrics,
            presence,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a stream that just opened (before its Hello).
    pub fn open(self: &Arc<Self>) -> Result<Registration, RegistryError> {
        let mut streams = self.lock();
        if streams.total >= self.limits.max_streams {
            return Err(RegistryError::ReplicaFull {
                max: self.limits.max_streams,
            });
        }
        streams.total += 1;
        streams.next_id += 1;
        self.metrics.open_streams.inc();
        Ok(Registration {
            registry: self.clone(),
            id: streams.next_id,
            stream: None,
        })
    }

    /// The sinks of `pc_id`'s open streams (usually one).
    pub fn sinks(&self, pc_id: &str) -> Vec<Arc<StreamSink>> {
        self.lock()
            .by_pc
            .get(pc_id)
            .map(|entries| entries.iter().filter_map(|e| e.sink.upgrade()).collect())
            .unwrap_or_default()
    }

    /// The endpoints with at least one open stream.
    pub fn connected(&self) -> Vec<String> {
        self.lock().by_pc.keys().cloned().collect()
    }

    /// The newest open stream of every endpoint connected here.
    pub fn open_streams(&self) -> Vec<StreamInfo> {
        self.lock()
            .by_pc
            .values()
            .filter_map(|entries| newest(entries).map(|e| e.info.clone()))
            .collect()
    }
}

fn newest(entries: &[Entry]) -> Option<&Entry> {
    entries
        .iter()
        .max_by_key(|e| (e.info.connected_since, e.id))
}

impl Registration {
    /// Binds this stream to its endpoint (its Hello), so the endpoint can be reached through
    /// `sink`, and tells presence it is connected.
    pub fn claim(
        &mut self,
        stream: StreamInfo,
        sink: &Arc<StreamSink>,
    ) -> Result<(), RegistryError> {
        debug_assert!(self.stream.is_none(), "a stream says Hello once");
        let max = self.registry.limits.max_streams_per_pc;
        let mut streams = self.registry.lock();
        let pc_id = stream.pc_id.clone();
        let entries = streams.by_pc.entry(pc_id.clone()).or_default();
        if entries.len() >= max {
            if entries.is_empty() {
                streams.by_pc.remove(&pc_id);
            }
            return Err(RegistryError::EndpointFull { pc_id, max });
        }
        entries.push(Entry {
            id: self.id,
            sink: Arc::downgrade(sink),
            info: stream.clone(),
        });
        let connected = streams.by_pc.len();
        drop(streams);
        self.registry
            .metrics
            .connected_endpoints
            .set(connected as i64);
        self.registry.presence.open(&stream);
        self.stream = Some(stream);
        Ok(())
    }

    /// The stream's endpoint and id, once it said Hello.
    pub fn stream(&self) -> Option<&StreamInfo> {
        self.stream.as_ref()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.metrics.open_streams.dec();
        let mut streams = self.registry.lock();
        streams.total -= 1;
        let Some(stream) = &self.stream else {
            return;
        };
        let Some(entries) = streams.by_pc.get_mut(&stream.pc_id) else {
            return;
        };
        entries.retain(|e| e.id != self.id);
        // The endpoint is still here on another stream (it reconnected before this one ended):
        // that one is what its row must say.
        let still_open = newest(entries).map(|e| e.info.clone());
        if entries.is_empty() {
            streams.by_pc.remove(&stream.pc_id);
        }
        let connected = streams.by_pc.len();
        drop(streams);
        self.registry
            .metrics
            .connected_endpoints
            .set(connected as i64);
        match still_open {
            Some(other) => self.registry.presence.open(&other),
            None => self.registry.presence.closed(stream),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::outbound;

    fn registry(max_streams: usize, max_streams_per_pc: usize) -> Arc<StreamRegistry> {
        StreamRegistry::new(
            RegistryLimits {
                max_streams,
                max_streams_per_pc,
            },
            Arc::new(Metrics::default()),
            Presence::new("test"),
        )
    }

    fn stream(pc_id: &str) -> StreamInfo {
        StreamInfo::opened(pc_id, "test")
    }

    fn sink() -> Arc<StreamSink> {
        Arc::new(outbound::channel(4, 4, CancellationToken::new()).0)
    }

    #[test]
    fn streams_are_found_by_endpoint_until_they_end() {
        let registry = registry(10, 2);
        let (a, b) = (sink(), sink());
        let mut first = registry.open().unwrap();
        first.claim(stream("pc-1"), &a).unwrap();
        let mut second = registry.open().unwrap();
        second.claim(stream("pc-1"), &b).unwrap();
        assert_eq!(registry.sinks("pc-1").len(), 2);
        assert!(registry.sinks("pc-2").is_empty());
        drop(first);
        let left = registry.sinks("pc-1");
        assert_eq!(left.len(), 1);
        assert!(Arc::ptr_eq(&left[0], &b));
        drop(second);
        assert!(registry.connected().is_empty());
    }

    #[test]
    fn limits_count_open_streams_overall_and_per_endpoint() {
        let registry = registry(3, 1);
        let s = sink();
        let mut one = registry.open().unwrap();
        one.claim(stream("pc-1"), &s).unwrap();
        let mut two = registry.open().unwrap();
        assert_eq!(
            two.claim(stream("pc-1"), &s),
            Err(RegistryError::EndpointFull {
                pc_id: "pc-1".into(),
                max: 1
            })
        );
        two.claim(stream("pc-2"), &s).unwrap();
        let _three = registry.open().unwrap();
        assert_eq!(
            registry.open().unwrap_err(),
            RegistryError::ReplicaFull { max: 3 }
        );
        drop(one);
        let _four = registry.open().expect("a place was given back");
        assert_eq!(registry.connected(), vec!["pc-2".to_string()]);
    }

    #[test]
    fn the_registry_never_keeps_a_sink_alive() {
        let registry = registry(10, 4);
        let s = sink();
        let mut r = registry.open().unwrap();
        r.claim(stream("pc-1"), &s).unwrap();
        drop(s);
        assert!(registry.sinks("pc-1").is_empty());
    }
}
