//! Restore safety: a region never reissues a version-vector counter its peers already hold.
//!
//! Counters live in the records, so a database restored from a backup (or rewound any other way)
//! would give a record written since the backup a vector its peers already hold under other
//! content: two writes under one version, which no merge can tell apart honestly. The outbox
//! sequence rewinds with the records, and every peer keeps the highest outbox id it applied per
//! actor (message ids carry both). So at start, before its first write, a region asks each peer
//! for its actor's entry and compares it with its own outbox sequence. If a peer holds more, the
//! database was rewound; if no peer answers, nothing vouches for it. Either way the region rotates
//! its incarnation: a new actor costs one vector entry, a reused one costs divergence. What the
//! rewind lost, the peers still hold, and a repair round against each brings it back. After a
//! proven rewind, `/readyz` answers 503 until a round against every peer has completed, so a load
//! balancer sends no reader to a region that lacks writes it once acknowledged. Silence alone
//! proves nothing (the peers may simply be down), so it rotates without holding readiness.

use std::sync::Arc;
use std::time::Duration;

use super::repair::{PeerClient, RepairError};
use crate::clock::version::Actor;
use crate::service::Region;

/// How long the peers have to answer at start. Peers starting alongside (a whole deployment
/// restarting) are asked again until then, so they are not taken for silent.
const ASK_WINDOW: Duration = Duration::from_secs(10);

/// What one peer said about this region's actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAnswer {
    /// The highest outbox id it applied from the actor (`None`: nothing yet).
    Applied(Option<i64>),
    Unreachable,
}

/// Whether to keep writing as the stored incarnation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// `rewound`: a peer proved the database was restored or rewound (it applied more than the
    /// database issued), rather than nobody answering.
    Rotate {
        why: String,
        rewound: bool,
    },
}

/// The rule, apart from I/O: rotate when a peer applied more than this database ever issued, or
/// when peers exist and none answered.
pub fn verdict(outbox_sequence: i64, answers: &[(String, PeerAnswer)]) -> Verdict {
    if let Some((peer, id)) = answers.iter().find_map(|(peer, answer)| match answer {
        PeerAnswer::Applied(Some(id)) if *id > outbox_sequence => Some((peer, id)),
        _ => None,
    }) {
        return Verdict::Rotate {
            why: format!(
                "{peer} applied outbox id {id} of this incarnation, but this database issued only {outbox_sequence}: it was restored or rewound"
            ),
            rewound: true,
        };
    }
    let nobody_answered = answers
        .iter()
        .all(|(_, answer)| *answer == PeerAnswer::Unreachable);
    if !answers.is_empty() && nobody_answered {
        return Verdict::Rotate {
            why: "no peer answered, so nothing vouches that this database was not restored".into(),
            rewound: false,
        };
    }
    Verdict::Keep
}

/// Settle the actor this region writes as; until then writes wait. Retries while PostgreSQL is
/// unreachable.
pub async fn run(region: Arc<Region>) {
    loop {
        match settle(&region).await {
            Ok(actor) => {
                region.settle_actor(actor);
                return;
            }
            Err(error) => {
                tracing::warn!(region = region.id(), %error, "checking the incarnation failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn settle(region: &Region) -> Result<Actor, RepairError> {
    let stored = &region.identity.incarnation;
    let actor = Actor::new(region.id(), stored);
    let outbox_sequence = region.store.outbox_sequence().await?;
    let client = PeerClient::new(region);
    let deadline = tokio::time::Instant::now() + ASK_WINDOW;
    let asks = region.config.peers.iter().map(|peer| {
        let (client, actor) = (&client, &actor);
        async move {
            let answer = loop {
                let asked = tokio::time::timeout_at(
                    deadline,
                    client.highest_outbox_id(&peer.id, actor),
                )
                .await;
                match asked {
                    Ok(Ok(id)) => break PeerAnswer::Applied(id),
                    Ok(Err(error)) if tokio::time::Instant::now() + Duration::from_millis(300) < deadline => {
                        tracing::debug!(region = region.id(), peer = %peer.id, %error, "peer cannot say yet what it applied from this region");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    _ => break PeerAnswer::Unreachable,
                }
            };
            (peer.id.clone(), answer)
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    match verdict(outbox_sequence, &answers) {
        Verdict::Keep => {
            tracing::info!(region = region.id(), incarnation = %stored, outbox_sequence, "incarnation kept");
            Ok(actor)
        }
        Verdict::Rotate { why, rewound } => {
            let incarnation = region.store.rotate_incarnation(stored).await?;
            tracing::warn!(region = region.id(), old = %stored, new = %incarnation, %why, "incarnation rotated; repairing from every peer");
            region.replication.incarnation_rotated();
            if rewound {
                region.catch_up_from_every_peer();
            }
            region.repair_wanted.notify_one();
            Ok(Actor::new(region.id(), &incarnation))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(list: &[(&str, PeerAnswer)]) -> Vec<(String, PeerAnswer)> {
        list.iter()
            .map(|(p, a)| (p.to_string(), a.clone()))
            .collect()
    }

    #[test]
    fn a_peer_that_applied_more_than_was_issued_means_a_rewind() {
        let said = answers(&[
            ("us", PeerAnswer::Applied(Some(7))),
            ("ap", PeerAnswer::Applied(Some(12))),
        ]);
        assert_eq!(verdict(12, &said), Verdict::Keep);
        assert!(matches!(
            verdict(11, &said),
            Verdict::Rotate { rewound: true, .. }
        ));
    }

    #[test]
    fn one_answer_vouches_but_silence_everywhere_does_not() {
        let one = answers(&[
            ("us", PeerAnswer::Unreachable),
            ("ap", PeerAnswer::Applied(None)),
        ]);
        assert_eq!(verdict(0, &one), Verdict::Keep);
        let none = answers(&[
            ("us", PeerAnswer::Unreachable),
            ("ap", PeerAnswer::Unreachable),
        ]);
        assert!(matches!(
            verdict(50, &none),
            Verdict::Rotate { rewound: false, .. }
        ));
        // A region without peers has nobody to reissue counters to.
        assert_eq!(verdict(0, &[]), Verdict::Keep);
    }
}
