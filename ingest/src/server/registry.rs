//! The open agent streams of this replica, by endpoint: what `--max-streams` and
//! `--max-streams-per-pc` count, and how ingest reaches an endpoint's stream to send it
//! something that is not an answer to one of its events.
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

use crate::{metrics::Metrics, outbound::StreamSink};

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

#[derive(Debug, Default)]
struct Streams {
    total: usize,
    next_id: u64,
    by_pc: HashMap<String, Vec<(u64, Weak<StreamSink>)>>,
}

/// Every open stream of this replica.
#[derive(Debug)]
pub struct StreamRegistry {
    streams: Mutex<Streams>,
    limits: RegistryLimits,
    metrics: Arc<Metrics>,
}

/// One stream's place in the registry; dropping it gives the place back.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<StreamRegistry>,
    id: u64,
    pc_id: Option<String>,
}

impl StreamRegistry {
    pub fn new(limits: RegistryLimits, metrics: Arc<Metrics>) -> Arc<StreamRegistry> {
        Arc::new(StreamRegistry {
            streams: Mutex::default(),
            limits,
            metrics,
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
            pc_id: None,
        })
    }

    /// The sinks of `pc_id`'s open streams (usually one).
    pub fn sinks(&self, pc_id: &str) -> Vec<Arc<StreamSink>> {
        self.lock()
            .by_pc
            .get(pc_id)
            .map(|entries| entries.iter().filter_map(|(_, s)| s.upgrade()).collect())
            .unwrap_or_default()
    }

    /// The endpoints with at least one open stream.
    pub fn connected(&self) -> Vec<String> {
        self.lock().by_pc.keys().cloned().collect()
    }
}

impl Registration {
    /// Binds this stream to `pc_id` (its Hello), so the endpoint can be reached through `sink`.
    pub fn claim(&mut self, pc_id: &str, sink: &Arc<StreamSink>) -> Result<(), RegistryError> {
        debug_assert!(self.pc_id.is_none(), "a stream says Hello once");
        let max = self.registry.limits.max_streams_per_pc;
        let mut streams = self.registry.lock();
        let entries = streams.by_pc.entry(pc_id.to_string()).or_default();
        if entries.len() >= max {
            if entries.is_empty() {
                streams.by_pc.remove(pc_id);
            }
            return Err(RegistryError::EndpointFull {
                pc_id: pc_id.to_string(),
                max,
            });
        }
        entries.push((self.id, Arc::downgrade(sink)));
        self.pc_id = Some(pc_id.to_string());
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.metrics.open_streams.dec();
        let mut streams = self.registry.lock();
        streams.total -= 1;
        if let Some(pc) = &self.pc_id
            && let Some(entries) = streams.by_pc.get_mut(pc)
        {
            entries.retain(|(id, _)| *id != self.id);
            if entries.is_empty() {
                streams.by_pc.remove(pc);
            }
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
        )
    }

    fn sink() -> Arc<StreamSink> {
        Arc::new(outbound::channel(4, CancellationToken::new()).0)
    }

    #[test]
    fn streams_are_found_by_endpoint_until_they_end() {
        let registry = registry(10, 2);
        let (a, b) = (sink(), sink());
        let mut first = registry.open().unwrap();
        first.claim("pc-1", &a).unwrap();
        let mut second = registry.open().unwrap();
        second.claim("pc-1", &b).unwrap();
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
        one.claim("pc-1", &s).unwrap();
        let mut two = registry.open().unwrap();
        assert_eq!(
            two.claim("pc-1", &s),
            Err(RegistryError::EndpointFull {
                pc_id: "pc-1".into(),
                max: 1
            })
        );
        two.claim("pc-2", &s).unwrap();
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
        r.claim("pc-1", &s).unwrap();
        drop(s);
        assert!(registry.sinks("pc-1").is_empty());
    }
}
