//! The event follower: agentd's WatchEvents read through every restart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;

use super::workload::channel;
use super::Places;

/// What the event follower saw.
#[derive(Debug, Default)]
pub(crate) struct Followed {
    pub events: u64,
    /// Every event seen, by seq, for the final comparison with a replay.
    pub by_seq: BTreeMap<u64, pb::Event>,
    pub violations: Vec<String>,
}

/// Follows agentd's WatchEvents through its restarts: after each broken
/// stream it resumes after the last seq it saw, and each event must be the
/// next seq (no gap, no repeat), until `stop` and one last drain.
pub(crate) async fn follow_events(places: Places, stop: Arc<AtomicBool>) -> Followed {
    let mut f = Followed::default();
    let mut last = 0u64;
    let Ok(channel) = channel(&places.agent_url) else {
        f.violations.push("event follower: no channel".into());
        return f;
    };
    let mut client = VmServiceClient::new(channel);
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let req = pb::WatchEventsRequest {
            since_seq: last,
            no_follow: stopping,
            ..Default::default()
        };
        let mut ended = false;
        if let Ok(stream) = client.watch_events(req).await {
            let mut stream = stream.into_inner();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
                match next {
                    Ok(Ok(Some(e))) => {
                        if e.seq != last + 1 {
                            f.violations.push(format!(
                                "events: seq {} followed {last} (gap or repeat)",
                                e.seq
                            ));
                        }
                        last = e.seq;
                        f.events += 1;
                        f.by_seq.insert(e.seq, e);
                    }
                    // The stream ended (no_follow drained) or broke (agentd died).
                    Ok(Ok(None)) => {
                        ended = true;
                        break;
                    }
                    Ok(Err(_)) => break,
                    Err(_) if stop.load(Ordering::SeqCst) && !stopping => break,
                    Err(_) => {}
                }
            }
        }
        if stopping && ended {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
