//! Helpers shared by the fuzz targets (a module of each target, not a target itself).

/// Where to cut an input for the streaming check "a parser that sees more bytes never changes its answer": every
/// strict prefix of a short input, the first and last 16 and 64 spread cuts of a long one (a full sweep is
/// quadratic and would slow the fuzzer down on long inputs).
pub fn cuts(len: usize) -> impl Iterator<Item = usize> {
    let all = len <= 256;
    let step = (len / 64).max(1);
    (0..len).filter(move |&k| all || k < 16 || k + 16 >= len || k % step == 0)
}
