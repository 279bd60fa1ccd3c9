//! A peer's bucket digests in binary frames, streamed while its scan runs. Pure, no I/O.
//!
//! Why not JSON: a million records fill all 65,536 buckets, and their digests as JSON (a hex
//! string each) took the peer 30–45 ms to encode beyond its scan, and the asking region more to
//! parse, all on a repair round's critical path: nothing else of the round starts before the
//! digests are compared. Fixed frames cost next to nothing either way, and go out as the scan
//! yields them, so the answer ends when the scan does.
//!
//! A frame is 28 bytes, big-endian: the bucket (`i32`), its record count (`i64`) and its hash
//! (`hi`, `lo`: `i64` each). The answer ends with a closing frame of bucket `-1` whose count is
//! the number of frames before it: an answer cut short at any byte, or by a peer whose scan
//! failed mid-way, is told from a complete one whatever the transport reports.

use super::digest::{BucketDigest, StateHash, BUCKETS};

/// The media type a region asks for, and answers with, to exchange digests as frames.
pub const DIGESTS_MEDIA_TYPE: &str = "application/vnd.locus.digests";

/// The answer's header giving the peer's tombstone reclamation horizon (an HLC), if any.
pub const RECLAIMED_THROUGH_HEADER: &str = "locus-reclaimed-through";
/// The answer's header saying whether the peer is catching up after a restore (`true`, `false`).
pub const RESTORING_HEADER: &str = "locus-restoring";

/// Bytes per frame.
pub const FRAME: usize = 28;

/// The bucket number of the closing frame.
const END: i32 = -1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the digests end before their closing frame")]
    Truncated,
    #[error("bytes follow the closing frame")]
    AfterEnd,
    #[error("the closing frame counts {said} digests, {got} came")]
    Miscounted { said: i64, got: usize },
    #[error("bucket {bucket} is out of range or out of order")]
    BadBucket { bucket: i32 },
}

/// Append `digest`'s frame to `out`.
pub fn encode(digest: &BucketDigest, out: &mut Vec<u8>) {
    frame(digest.bucket, digest.count, digest.hash, out);
}

/// Append the closing frame, after `digests` frames.
pub fn encode_end(digests: usize, out: &mut Vec<u8>) {
    frame(END, digests as i64, StateHash::default(), out);
}

fn frame(bucket: i32, count: i64, hash: StateHash, out: &mut Vec<u8>) {
    out.extend_from_slice(&bucket.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&hash.hi.to_be_bytes());
    out.extend_from_slice(&hash.lo.to_be_bytes());
}

/// Decodes frames as the bytes arrive, in pieces of any size.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The start of a frame that the last piece cut.
    partial: Vec<u8>,
    digests: Vec<BucketDigest>,
    ended: bool,
}

impl Decoder {
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FrameError> {
        if !self.partial.is_empty() {
            let wanted = (FRAME - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..wanted]);
            bytes = &bytes[wanted..];
            if self.partial.len() < FRAME {
                return Ok(());
            }
            let whole = std::mem::take(&mut self.partial);
            self.take(&whole)?;
        }
        let mut frames = bytes.chunks_exact(FRAME);
        for whole in &mut frames {
            self.take(whole)?;
        }
        self.partial.extend_from_slice(frames.remainder());
        Ok(())
    }

    /// The digests, in bucket order, if the closing frame came and counted them all.
    pub fn finish(self) -> Result<Vec<BucketDigest>, FrameError> {
        if self.ended && self.partial.is_empty() {
            Ok(self.digests)
        } else {
            Err(FrameError::Truncated)
        }
    }

    fn take(&mut self, whole: &[u8]) -> Result<(), FrameError> {
        if self.ended {
            return Err(FrameError::AfterEnd);
        }
        let field = |at: usize| i64::from_be_bytes(whole[at..at + 8].try_into().expect("8 bytes"));
        let bucket = i32::from_be_bytes(whole[..4].try_into().expect("4 bytes"));
        let count = field(4);
        if bucket == END {
            if count != self.digests.len() as i64 {
                return Err(FrameError::Miscounted {
                    said: count,
                    got: self.digests.len(),
                });
            }
            self.ended = true;
            return Ok(());
        }
        // Each bucket once, in order: a repeated one would be counted twice.
        let after_last = self.digests.last().is_none_or(|last| bucket > last.bucket);
        if !(0..BUCKETS as i32).contains(&bucket) || !after_last {
            return Err(FrameError::BadBucket { bucket });
        }
        self.digests.push(BucketDigest {
            bucket,
            count,
            hash: StateHash {
                hi: field(12),
                lo: field(20),
            },
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_digests() -> impl Strategy<Value = Vec<BucketDigest>> {
        proptest::collection::btree_map(
            0..BUCKETS as i32,
            (any::<i64>(), any::<(i64, i64)>()),
            0..200,
        )
        .prop_map(|buckets| {
            buckets
                .into_iter()
                .map(|(bucket, (count, (hi, lo)))| BucketDigest {
                    bucket,
                    count,
                    hash: StateHash { hi, lo },
                })
                .collect()
        })
    }

    fn encoded(digests: &[BucketDigest]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for digest in digests {
            encode(digest, &mut bytes);
        }
        encode_end(digests.len(), &mut bytes);
        bytes
    }

    proptest! {
        #[test]
        fn digests_come_back_whatever_pieces_the_bytes_arrive_in(
            digests in arb_digests(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let bytes = encoded(&digests);
            let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
            at.push(0);
            at.push(bytes.len());
            at.sort_unstable();
            let mut decoder = Decoder::default();
            for piece in at.windows(2) {
                decoder.feed(&bytes[piece[0]..piece[1]]).unwrap();
            }
            prop_assert_eq!(decoder.finish().unwrap(), digests);
        }

        #[test]
        fn an_answer_cut_short_anywhere_is_refused(digests in arb_digests(), cut in any::<prop::sample::Index>()) {
            let bytes = encoded(&digests);
            let kept = cut.index(bytes.len()); // strictly shorter
            let mut decoder = Decoder::default();
            let fed = decoder.feed(&bytes[..kept]);
            prop_assert!(fed.is_err() || decoder.finish().is_err());
        }

        #[test]
        fn a_closing_frame_that_miscounts_is_refused(digests in arb_digests(), extra in 1..5usize) {
            let mut bytes = Vec::new();
            for digest in &digests {
                encode(digest, &mut bytes);
            }
            encode_end(digests.len() + extra, &mut bytes);
            let mut decoder = Decoder::default();
            prop_assert_eq!(
                decoder.feed(&bytes),
                Err(FrameError::Miscounted { said: (digests.len() + extra) as i64, got: digests.len() })
            );
        }
    }

    #[test]
    fn frames_after_the_end_and_buckets_out_of_order_are_refused() {
        let digest = |bucket| BucketDigest {
            bucket,
            count: 1,
            hash: StateHash { hi: 1, lo: 2 },
        };
        let mut bytes = encoded(&[digest(3)]);
        encode(&digest(4), &mut bytes);
        assert_eq!(Decoder::default().feed(&bytes), Err(FrameError::AfterEnd));

        for wrong in [
            [digest(5), digest(5)],
            [digest(5), digest(2)],
            [digest(1), digest(BUCKETS as i32)],
        ] {
            let bytes = encoded(&wrong);
            assert_eq!(
                Decoder::default().feed(&bytes),
                Err(FrameError::BadBucket {
                    bucket: wrong[1].bucket
                })
            );
        }
        // Nothing at all is not an empty answer.
        assert_eq!(Decoder::default().finish(), Err(FrameError::Truncated));
    }
}
