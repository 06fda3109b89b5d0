//! The relay's frame-boundary tracker, fed arbitrary chunkings of a byte stream, checked against the reference
//! decoder `frame::decode` run frame after frame over the whole stream.
//!
//! Input layout: byte 0 = n (mod 16), then n chunk sizes (one byte each, used in turn; 0 feeds an empty chunk; all
//! zero or none means one chunk), then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::frame::{decode, FrameTracker};

/// Largest payload the reference decoder accepts: as large as possible while `header + payload` still fits in a
/// usize (decode adds them). A frame declaring more than this could never be complete in a fuzz input anyway.
const MAX_PAYLOAD: usize = usize::MAX - 14;

/// Offsets just after each complete frame of `stream`, and whether the frames end exactly at its end.
fn reference_ends(stream: &[u8]) -> (Vec<usize>, bool) {
    // The tracker ignores RSV bits (extensions are negotiated end to end, the relay passes them through); the
    // reference decoder refuses them. Clearing them at each frame start changes no length.
    let mut bytes = stream.to_vec();
    let mut ends = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        bytes[pos] &= !0x70;
        match decode(&bytes[pos..], MAX_PAYLOAD) {
            Ok(Some((_, used))) => {
                assert!(used >= 2 && used <= bytes.len() - pos, "decode used {used}");
                pos += used;
                ends.push(pos);
            }
            Ok(None) => break,
            Err(e) => {
                assert_eq!(
                    e, "frame too large",
                    "only the size can be refused once RSV bits are clear"
                );
                break;
            }
        }
    }
    (ends, pos == bytes.len())
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let one_chunk = sizes.iter().all(|s| *s == 0);
    let (ends, exact) = reference_ends(stream);

    let mut tracker = FrameTracker::new();
    let mut offset = 0;
    // ends[next..] are the frame ends after `offset`.
    let mut next = 0;
    let mut turn = 0;
    while offset < stream.len() {
        let size = if one_chunk {
            stream.len()
        } else {
            usize::from(sizes[turn % sizes.len()])
        };
        turn += 1;
        let end = offset + size.min(stream.len() - offset);

        // A read of `until_boundary` bytes never passes a frame end.
        let step = tracker.until_boundary(usize::MAX);
        assert!(step >= 1);
        let limit = offset.saturating_add(step);
        assert!(
            !ends[next..].iter().any(|e| *e < limit),
            "at {offset}, until_boundary {step} passes the frame end {:?} (ends {ends:?})",
            ends.get(next)
        );

        let got = tracker.feed(&stream[offset..end]);
        let mut last = None;
        while next < ends.len() && ends[next] <= end {
            last = Some(ends[next] - offset);
            next += 1;
        }
        // `feed` returns the offset just after the last frame that ended inside the chunk.
        assert_eq!(
            got, last,
            "chunk {offset}..{end}: tracker says {got:?}, reference frame ends {ends:?}"
        );
        let at_end = end == 0 || (next > 0 && ends[next - 1] == end);
        assert_eq!(
            tracker.at_boundary(),
            at_end,
            "after chunk {offset}..{end} (ends {ends:?})"
        );
        offset = end;
    }
    assert_eq!(
        tracker.at_boundary(),
        exact,
        "end of stream ({} bytes), reference ends {ends:?}",
        stream.len()
    );
});
