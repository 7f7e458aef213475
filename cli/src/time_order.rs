//! Keeping the most rows of a trace that are in time order.

/// No row: the end of a chain of rows.
pub const END: u32 = u32::MAX;

/// The longest subsequence of `rows` whose times never decrease (equal times are in order),
/// as a chain: the index of its first row, and for each row of the chain the index of the next
/// (`END` after the last; the links of rows off the chain mean nothing). Of several such
/// subsequences, the one that keeps the earliest rows. `rows` holds fewer than `END` rows.
///
/// Patience sorting from the last row back, in O(n log n) time and 4 bytes a row (8 at most):
/// `best[k]` is the row, among those seen, that starts an ordered run of k + 1 rows with the
/// latest time; those times never increase with k. A row starts a run one longer than the
/// rows of `best` whose times are not before its own, and links to the last of them. Two rows
/// starting equally long runs are in decreasing time order (else the earlier one would start a
/// longer run), so the row linked to, the latest in time, is also the earliest in the file.
pub fn in_time_order<T>(rows: &[T], time: impl Fn(&T) -> u64) -> (u32, Vec<u32>) {
    let mut next = vec![END; rows.len()];
    let mut best: Vec<u32> = Vec::new();
    for (i, row) in rows.iter().enumerate().rev() {
        let t = time(row);
        let p = best.partition_point(|&j| time(&rows[j as usize]) >= t);
        if p > 0 {
            next[i] = best[p - 1];
        }
        if p == best.len() {
            best.push(i as u32);
        } else {
            best[p] = i as u32;
        }
    }
    (best.last().copied().unwrap_or(END), next)
}
