//! Traces: the Azure LLM inference trace 2023 and sluicegate's own CSV, told apart by their
//! header line (format: `docs/trace-format.md`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;

use sluicegate_core::ServiceTier;

use crate::line_starts::LineStarts;
use crate::time_order::{END, in_time_order};

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRequest {
    /// The line of the file the row starts on (the header is line 1).
    pub line: u64,
    /// Time since the trace's first request, ns.
    pub t_ns: u64,
    /// Account: an index into [`Trace::accounts`].
    pub account: u32,
    /// Model: an index into [`Trace::models`].
    pub model: u32,
    /// Fast variant.
    pub fast: bool,
    /// The service tier asked for (the trace's `priority` column).
    pub service_tier: ServiceTier,
    /// Choices.
    pub n: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Prompt tokens expected from the cache (also what the backend reports).
    pub cached_tokens: u64,
    /// The request's max_tokens (the generation reserved).
    pub max_tokens: u64,
    /// Tokens actually generated.
    pub generated_tokens: u64,
}

/// A row that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRow {
    /// 1-based line number in the file (the header is line 1).
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// How to turn a trace into requests.
#[derive(Clone, Debug)]
pub struct Options {
    /// Spread requests that name no account over this many accounts, by a stable hash.
    pub accounts: u64,
    /// Skew that spread: account k (from 0) gets a share ∝ 1/(k+1)^s; `None` or 0 is uniform.
    pub accounts_zipf: Option<f64>,
    /// Fraction of requests sent on the priority tier, by a stable hash.
    pub priority_share: f64,
    /// The model for traces that name none.
    pub model: String,
    /// Stop at the first bad row instead of skipping it.
    pub strict: bool,
}

/// A parsed trace.
#[derive(Debug)]
pub struct Trace {
    /// The usable requests, in time order.
    pub requests: Vec<TraceRequest>,
    /// Account ids, each once, in order of first appearance.
    pub accounts: Vec<String>,
    /// Model ids, each once, in order of first appearance.
    pub models: Vec<String>,
    /// Rows skipped, in line order.
    pub bad: Vec<BadRow>,
    /// "azure" or "sluicegate".
    pub format: &'static str,
    /// Unix time of the first request (the first row kept), when the trace gives dates (Azure's do).
    pub start_unix_ns: Option<u64>,
}

/// Why a trace could not be read at all.
#[derive(Debug)]
pub enum TraceError {
    /// The file could not be read or is not CSV.
    Io(String),
    /// The header line is neither format's.
    UnknownFormat(String),
    /// `--strict` and a bad row (the first in the file).
    Bad(BadRow),
    /// The options cannot be applied to this trace.
    Options(String),
}

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceError::Io(e) => write!(f, "cannot read trace: {e}"),
            TraceError::UnknownFormat(h) => write!(
                f,
                "unknown trace format (header {h:?}); expected TIMESTAMP,ContextTokens,GeneratedTokens or {OWN_HEADER}"
            ),
            TraceError::Bad(b) => write!(f, "line {}: {}", b.line, b.reason),
            TraceError::Options(e) => f.write_str(e),
        }
    }
}

const AZURE_HEADER: &str = "TIMESTAMP,ContextTokens,GeneratedTokens";
const OWN_HEADER: &str =
    "t_ms,account,model,variant,priority,n,prompt_tokens,cached_tokens,max_tokens,generated_tokens";

/// A stable 64-bit mix of a row number, for spreading rows over accounts and tiers.
fn mix(x: u64, salt: u64) -> u64 {
    let mut z = x.wrapping_add(salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

/// Names, each stored once, numbered in order of first appearance.
#[derive(Default)]
struct Names {
    index: HashMap<String, u32>,
    names: Vec<String>,
}

impl Names {
    fn id(&mut self, name: &str) -> Result<u32, String> {
        if let Some(&id) = self.index.get(name) {
            return Ok(id);
        }
        let id = u32::try_from(self.names.len()).map_err(|_| "more than 2^32 distinct names".to_string())?;
        self.index.insert(name.to_string(), id);
        self.names.push(name.to_string());
        Ok(id)
    }
}

/// A parsed row before its names are numbered.
struct Row<'a> {
    account: Cow<'a, str>,
    model: Cow<'a, str>,
    /// Its `t_ns` is still the row's absolute time.
    request: TraceRequest,
}

/// How rows that name no account (Azure's) are spread over `--accounts`, by a stable hash of
/// a number of their own (csv's line count where they begin).
enum Spread {
    /// Each of this many accounts alike.
    Uniform(u64),
    /// Account k's share ∝ 1/(k+1)^s: the running sum of the shares, the last 1.
    Zipf(Vec<f64>),
}

/// The most accounts `--accounts-zipf` spreads over (a table of 8 bytes each).
const MAX_ZIPF_ACCOUNTS: u64 = 1 << 24;

impl Spread {
    fn new(options: &Options) -> Result<Spread, TraceError> {
        let accounts = options.accounts.max(1);
        let s = match options.accounts_zipf {
            Some(s) if s > 0.0 => s,
            _ => return Ok(Spread::Uniform(accounts)),
        };
        if accounts > MAX_ZIPF_ACCOUNTS {
            return Err(TraceError::Options(format!(
                "--accounts-zipf spreads over at most {MAX_ZIPF_ACCOUNTS} accounts, not {accounts}"
            )));
        }
        let mut sum = 0.0;
        let mut cumulative: Vec<f64> = (0..accounts)
            .map(|k| {
                sum += ((k + 1) as f64).powf(-s);
                sum
            })
            .collect();
        for c in &mut cumulative {
            *c /= sum;
        }
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Ok(Spread::Zipf(cumulative))
    }

    /// The account (from 0) of the row `key` names.
    fn account(&self, key: u64) -> u64 {
        match self {
            Spread::Uniform(accounts) => mix(key, 1) % accounts,
            Spread::Zipf(cumulative) => {
                // u uniform in [0, 1), then the inverse of the shares' distribution.
                let u = (mix(key, 1) >> 11) as f64 / (1u64 << 53) as f64;
                cumulative.partition_point(|&c| c <= u).min(cumulative.len() - 1) as u64
            }
        }
    }
}

/// Reads a trace from `input`.
///
/// Every row is parsed first; then the rows kept are the longest run (not necessarily
/// contiguous) whose times never decrease, so that one mistyped timestamp costs its own row
/// only. The others are reported as out of order.
pub fn read(input: impl Read, options: &Options) -> Result<Trace, TraceError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(LineStarts::new(input));
    let header =
        reader.headers().map_err(|e| TraceError::Io(e.to_string()))?.iter().collect::<Vec<_>>().join(",");
    let format = match header.as_str() {
        AZURE_HEADER => "azure",
        OWN_HEADER => "sluicegate",
        _ => return Err(TraceError::UnknownFormat(header)),
    };
    let spread = if format == "azure" { Spread::new(options)? } else { Spread::Uniform(1) };
    let (mut accounts, mut models) = (Names::default(), Names::default());
    // Rows with their absolute times, in the file's order.
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record);
        let position = record.position();
        // csv's count, where the record before ended: still what rows are spread by, so that
        // spreads don't change; `line` is the row's real line.
        let csv_line = position.map_or(0, csv::Position::line);
        let line = position.and_then(|p| reader.get_mut().line_at(p.byte())).unwrap_or(csv_line);
        let parsed = match more {
            Ok(false) => break,
            Ok(true) => {
                let fields: Vec<&str> = record.iter().collect();
                if format == "azure" {
                    azure(&fields, line, csv_line, &spread, options)
                } else {
                    own(&fields, line)
                }
            }
            Err(e) => Err(e.to_string()),
        };
        let parsed = parsed.and_then(|row| {
            let account = accounts.id(&row.account)?;
            let model = models.id(&row.model)?;
            Ok(TraceRequest { account, model, ..row.request })
        });
        match parsed {
            Ok(r) => rows.push(r),
            Err(reason) => bad.push(BadRow { line, reason }),
        }
    }
    if rows.len() >= END as usize {
        return Err(TraceError::Io(format!("more than {} rows", END - 1)));
    }

    let (first, next) = in_time_order(&rows, |r| r.t_ns);
    let origin = rows.get(first as usize).map(|r| r.t_ns);
    let start = origin.unwrap_or(0);
    // Kept rows move to the front, their times made relative; the others are reported with
    // the kept rows around them.
    let (mut kept, mut upcoming, mut previous) = (0, first, None);
    let mut out_of_order = Vec::new();
    for i in 0..rows.len() {
        if i == upcoming as usize {
            let t_ns = rows[i].t_ns - start;
            rows[i].t_ns = t_ns;
            rows.swap(kept, i);
            kept += 1;
            previous = Some(t_ns);
            upcoming = next[i];
        } else {
            let after = rows.get(upcoming as usize).map(|r| r.t_ns - start);
            let reason = out_of_order_reason(rows[i].t_ns, start, previous, after);
            out_of_order.push(BadRow { line: rows[i].line, reason });
        }
    }
    rows.truncate(kept);
    bad.append(&mut out_of_order);
    bad.sort_by_key(|b| b.line);
    if options.strict && !bad.is_empty() {
        return Err(TraceError::Bad(bad.swap_remove(0)));
    }
    Ok(Trace {
        requests: rows,
        accounts: accounts.names,
        models: models.names,
        bad,
        format,
        start_unix_ns: origin.filter(|_| format == "azure"),
    })
}

/// Why a row at `t_ns` (absolute) is out of order, given the times (relative to `origin`) of
/// the kept rows before and after it.
fn out_of_order_reason(t_ns: u64, origin: u64, before: Option<u64>, after: Option<u64>) -> String {
    let ms = |ns: i128| ns.div_euclid(1_000_000);
    let t = ms(i128::from(t_ns) - i128::from(origin));
    let (before, after) = (before.map(|b| ms(b.into())), after.map(|a| ms(a.into())));
    match (before, after) {
        (Some(b), Some(a)) => format!("timestamp out of order ({t} ms, between rows at {b} ms and {a} ms)"),
        (None, Some(a)) => format!("timestamp out of order ({t} ms, before the row at {a} ms)"),
        (Some(b), None) => format!("timestamp out of order ({t} ms, after the row at {b} ms)"),
        (None, None) => format!("timestamp out of order ({t} ms)"),
    }
}

fn field<'a>(fields: &[&'a str], i: usize, name: &str) -> Result<&'a str, String> {
    fields.get(i).copied().filter(|f| !f.is_empty()).ok_or_else(|| format!("missing field {name}"))
}

fn count(fields: &[&str], i: usize, name: &str) -> Result<u64, String> {
    let text = field(fields, i, name)?;
    if text.starts_with('-') {
        return Err(format!("{name} is negative: {text}"));
    }
    text.parse().map_err(|_| format!("{name} is not a whole number: {text}"))
}

/// An Azure row: `2023-11-16 18:15:46.6805900,374,44`. It names no account or model and no
/// max_tokens; the generated count is used as the reservation. `key` picks its account and tier.
fn azure<'a>(
    fields: &[&'a str],
    line: u64,
    key: u64,
    spread: &Spread,
    o: &'a Options,
) -> Result<Row<'a>, String> {
    let t_ns = timestamp_ns(field(fields, 0, "TIMESTAMP")?)?;
    let prompt_tokens = count(fields, 1, "ContextTokens")?;
    let generated_tokens = count(fields, 2, "GeneratedTokens")?;
    let account = Cow::Owned(format!("acct-{}", spread.account(key)));
    let priority = (mix(key, 2) % 1_000_000) < (o.priority_share.clamp(0.0, 1.0) * 1e6) as u64;
    let service_tier = if priority { ServiceTier::Priority } else { ServiceTier::Default };
    let request = TraceRequest {
        line,
        t_ns,
        account: 0,
        model: 0,
        fast: false,
        service_tier,
        n: 1,
        prompt_tokens,
        cached_tokens: 0,
        max_tokens: generated_tokens,
        generated_tokens,
    };
    Ok(Row { account, model: Cow::Borrowed(&o.model), request })
}

/// A row of sluicegate's own format.
fn own<'a>(fields: &[&'a str], line: u64) -> Result<Row<'a>, String> {
    let t_ms = count(fields, 0, "t_ms")?;
    let variant = field(fields, 3, "variant")?;
    let fast = match variant {
        "regular" => false,
        "fast" => true,
        other => return Err(format!("variant must be regular or fast, not {other:?}")),
    };
    // The column kept its name from when there were two tiers: 0 and 1 still mean them.
    let service_tier = match field(fields, 4, "priority")? {
        "0" | "false" => ServiceTier::Default,
        "1" | "true" => ServiceTier::Priority,
        name => ServiceTier::from_name(name.as_bytes())
            .ok_or_else(|| format!("priority must be 0, 1, flex, default or priority, not {name:?}"))?,
    };
    let request = TraceRequest {
        line,
        t_ns: t_ms.saturating_mul(1_000_000),
        account: 0,
        model: 0,
        fast,
        service_tier,
        n: count(fields, 5, "n")?,
        prompt_tokens: count(fields, 6, "prompt_tokens")?,
        cached_tokens: count(fields, 7, "cached_tokens")?,
        max_tokens: count(fields, 8, "max_tokens")?,
        generated_tokens: count(fields, 9, "generated_tokens")?,
    };
    let (account, model) = (field(fields, 1, "account")?, field(fields, 2, "model")?);
    Ok(Row { account: account.into(), model: model.into(), request })
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` as ns since the Unix epoch (UTC).
fn timestamp_ns(text: &str) -> Result<u64, String> {
    let bad = || format!("TIMESTAMP is not YYYY-MM-DD HH:MM:SS: {text:?}");
    let (date, time) = text.split_once(' ').ok_or_else(bad)?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (y, m, day) = (d.next().ok_or_else(bad)??, d.next().ok_or_else(bad)??, d.next().ok_or_else(bad)??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (hh, mm, ss) = (t.next().ok_or_else(bad)??, t.next().ok_or_else(bad)??, t.next().ok_or_else(bad)??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    // Days since 1970-01-01 (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let digits: String = fraction.chars().take(9).collect();
    let nanos = format!("{digits:0<9}").parse::<u64>().map_err(|_| bad())?;
    let secs = days * 86_400 + hh * 3_600 + mm * 60 + ss;
    u64::try_from(secs).map(|s| s * 1_000_000_000 + nanos).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_timestamps_parse_to_ns() {
        assert_eq!(timestamp_ns("1970-01-01 00:00:01.5").unwrap(), 1_500_000_000);
        let a = timestamp_ns("2023-11-16 18:15:46.6805900").unwrap();
        let b = timestamp_ns("2023-11-16 18:15:50.9951690").unwrap();
        assert_eq!(b - a, 4_314_579_000);
        assert_eq!(a / 1_000_000_000, 1_700_158_546);
        assert!(timestamp_ns("yesterday").is_err());
    }

    fn options() -> Options {
        Options { accounts: 1, accounts_zipf: None, priority_share: 0.0, model: "m".into(), strict: false }
    }

    /// The indices of the rows `in_time_order` keeps.
    fn kept(times: &[u64]) -> Vec<usize> {
        let (first, next) = in_time_order(times, |&t| t);
        let mut chain = Vec::new();
        let mut i = first;
        while i != END {
            chain.push(i as usize);
            i = next[i as usize];
        }
        chain
    }

    /// A sluicegate-format trace with these `t_ms`, one row each.
    fn own_trace(times_ms: &[u64], options: &Options) -> Result<Trace, TraceError> {
        let mut body = format!("{OWN_HEADER}\n");
        for t in times_ms {
            body.push_str(&format!("{t},a,m,regular,0,1,10,0,5,5\n"));
        }
        read(body.as_bytes(), options)
    }

    fn lines_kept(trace: &Trace) -> Vec<u64> {
        trace.requests.iter().map(|r| r.line).collect()
    }

    #[test]
    fn a_far_future_typo_in_the_middle_costs_only_its_row() {
        assert_eq!(kept(&[0, 100, 200, 9_999_999_999, 300, 400]), [0, 1, 2, 4, 5]);
        let trace = own_trace(&[0, 100, 200, 9_999_999_999, 300, 400], &options()).unwrap();
        // The header is line 1: the typo is on line 5.
        assert_eq!(lines_kept(&trace), [2, 3, 4, 6, 7]);
        let times: Vec<u64> = trace.requests.iter().map(|r| r.t_ns / 1_000_000).collect();
        assert_eq!(times, [0, 100, 200, 300, 400]);
        assert_eq!(
            trace.bad,
            [BadRow {
                line: 5,
                reason: "timestamp out of order (9999999999 ms, between rows at 200 ms and 300 ms)".into()
            }]
        );
    }

    #[test]
    fn a_too_early_typo_costs_only_its_row() {
        assert_eq!(kept(&[1_000, 1_100, 5, 1_200, 1_300]), [0, 1, 3, 4]);
        let trace = own_trace(&[1_000, 1_100, 5, 1_200, 1_300], &options()).unwrap();
        assert_eq!(lines_kept(&trace), [2, 3, 5, 6]);
        assert_eq!(trace.requests[0].t_ns, 0);
        assert_eq!(trace.bad.len(), 1);
        assert_eq!(trace.bad[0].line, 4);
        assert_eq!(
            trace.bad[0].reason,
            "timestamp out of order (-995 ms, between rows at 100 ms and 200 ms)"
        );
    }

    #[test]
    fn a_typo_in_the_first_row_is_not_the_origin() {
        assert_eq!(kept(&[9_999_999_999, 0, 100, 200]), [1, 2, 3]);
        let trace = own_trace(&[9_999_999_999, 50, 150, 250], &options()).unwrap();
        assert_eq!(lines_kept(&trace), [3, 4, 5]);
        let times: Vec<u64> = trace.requests.iter().map(|r| r.t_ns / 1_000_000).collect();
        assert_eq!(times, [0, 100, 200]);
        assert_eq!(trace.bad.len(), 1);
        assert_eq!(trace.bad[0].line, 2);
        assert_eq!(trace.bad[0].reason, "timestamp out of order (9999999949 ms, before the row at 0 ms)");
    }

    #[test]
    fn a_typo_in_the_last_row_is_reported_after_the_row_before() {
        let trace = own_trace(&[0, 100, 200, 300, 7], &options()).unwrap();
        assert_eq!(lines_kept(&trace), [2, 3, 4, 5]);
        assert_eq!(
            trace.bad[0],
            BadRow { line: 6, reason: "timestamp out of order (7 ms, after the row at 300 ms)".into() }
        );
    }

    #[test]
    fn an_azure_typo_in_the_first_row_does_not_date_the_trace() {
        let body = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2032-11-16 18:15:46.0,1,1\n\
                    2023-11-16 18:15:46.5,1,1\n\
                    2023-11-16 18:15:47.0,1,1\n\
                    2023-11-16 18:15:48.0,1,1\n";
        let trace = read(body.as_bytes(), &options()).unwrap();
        assert_eq!(lines_kept(&trace), [3, 4, 5]);
        assert_eq!(trace.start_unix_ns, Some(timestamp_ns("2023-11-16 18:15:46.5").unwrap()));
        assert_eq!(trace.requests[2].t_ns, 1_500_000_000);
        assert_eq!(trace.bad.len(), 1);
        assert_eq!(trace.bad[0].line, 2);
        assert!(trace.bad[0].reason.starts_with("timestamp out of order ("), "{:?}", trace.bad);
    }

    #[test]
    fn a_real_gap_and_equal_timestamps_are_kept() {
        assert_eq!(kept(&[0, 1_700_000_000_000]), [0, 1]);
        let trace = own_trace(&[0, 1_700_000_000_000, 1_700_000_000_000, 1_700_000_000_001], &options());
        let trace = trace.unwrap();
        assert!(trace.bad.is_empty(), "{:?}", trace.bad);
        assert_eq!(trace.requests[3].t_ns, 1_700_000_000_001 * 1_000_000);
        assert_eq!(kept(&[5, 5, 5, 7, 7, 9]), [0, 1, 2, 3, 4, 5]);
        assert_eq!(kept(&[]), Vec::<usize>::new());
        assert_eq!(kept(&[3]), [0]);
    }

    #[test]
    fn a_million_rows_with_a_typo_in_a_thousand_lose_only_the_typos() {
        let times: Vec<u64> = (0..1_000_000u64)
            .map(|i| match (i % 1_000, i / 1_000 % 2) {
                (500, 0) => u64::MAX / 2 + mix(i, 3) / 2, // far in the future
                (500, _) => mix(i, 3) % (i * 7),          // earlier
                _ => i * 7,
            })
            .collect();
        let kept = kept(&times);
        assert_eq!(kept.len(), 999_000);
        assert!(kept.iter().all(|&i| i % 1_000 != 500));
    }

    #[test]
    fn of_equally_long_orders_the_earliest_rows_are_kept() {
        assert_eq!(kept(&[0, 500, 100, 600]), [0, 1, 3]);
        assert_eq!(kept(&[0, 9_999, 100]), [0, 1]);
        assert_eq!(kept(&[9_999, 0]), [0]);
        assert_eq!(kept(&[3, 2, 1]), [0]);
    }

    /// Against brute force: every subset of up to 10 rows with times from a small range (many ties).
    #[test]
    fn the_rows_kept_are_the_longest_ordered_run_with_the_earliest_rows() {
        for case in 0..3_000u64 {
            let n = (mix(case, 7) % 11) as usize;
            let times: Vec<u64> = (0..n as u64).map(|i| mix(case * 16 + i, 9) % 5).collect();
            // Subsets as bit masks, row 0 the highest bit: the largest mask of the longest ordered
            // subsets is the one with the earliest rows.
            let ordered = |mask: u32| {
                let rows: Vec<usize> = (0..n).filter(|&i| mask >> (n - 1 - i) & 1 == 1).collect();
                rows.windows(2).all(|w| times[w[0]] <= times[w[1]])
            };
            let best = (0..1u32 << n)
                .filter(|&m| ordered(m))
                .max_by_key(|&m| (m.count_ones(), m))
                .unwrap_or_default();
            let want: Vec<usize> = (0..n).filter(|&i| best >> (n - 1 - i) & 1 == 1).collect();
            assert_eq!(kept(&times), want, "{times:?}");
        }
    }

    #[test]
    fn bad_rows_are_in_line_order_and_strict_returns_the_first() {
        let body = format!(
            "{OWN_HEADER}\n0,a,m,regular,0,1,10,0,5,5\n100,a,m\n9999999,a,m,regular,0,1,10,0,5,5\n\
             200,a,m,regular,0,1,10,0,5,5\n300,a,m,regular,0,-1,10,0,5,5\n400,a,m,regular,0,1,10,0,5,5\n"
        );
        let trace = read(body.as_bytes(), &options()).unwrap();
        let lines: Vec<u64> = trace.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [3, 4, 6], "{:?}", trace.bad);
        assert!(trace.bad[1].reason.starts_with("timestamp out of order"), "{:?}", trace.bad);
        assert_eq!(lines_kept(&trace), [2, 5, 7]);
        let strict = Options { strict: true, ..options() };
        match read(body.as_bytes(), &strict) {
            Err(TraceError::Bad(b)) => assert_eq!(b.line, 3, "{b:?}"),
            other => panic!("{other:?}"),
        }
        // An out-of-order row before the first unreadable one is the one returned.
        match own_trace(&[0, 9_999_999, 100, 200], &strict) {
            Err(TraceError::Bad(b)) => {
                assert_eq!(b.line, 3);
                assert!(b.reason.starts_with("timestamp out of order"), "{}", b.reason);
            }
            other => panic!("{other:?}"),
        }
        assert!(own_trace(&[0, 100, 100, 200], &strict).is_ok());
    }

    /// Reads at most 3 bytes at a time.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn rows_are_numbered_by_their_real_lines() {
        let row = "0,a,m,regular,0,1,10,0,5,5";
        // Blank lines, a quoted field over two lines (an extra column: rows are flexible).
        let body = format!("{OWN_HEADER}\n{row}\n\n\n{row},\"two\nlines\"\n\n0,a,m\n{row}\n");
        let trace = read(body.as_bytes(), &options()).unwrap();
        assert_eq!(lines_kept(&trace), [2, 5, 9]);
        assert_eq!(trace.bad, [BadRow { line: 8, reason: "missing field variant".into() }]);
        // CRLF line ends, blank lines among them, no line end at the end.
        let body = format!("{OWN_HEADER}\r\n{row}\r\n\r\n0,a,m\r\n{row}\r\n\r\n\r\n{row}");
        let trace = read(body.as_bytes(), &options()).unwrap();
        assert_eq!(lines_kept(&trace), [2, 5, 8]);
        assert_eq!(trace.bad[0].line, 4);
        // Lines of any length, read a few bytes at a time.
        let long = format!("{row},\"{}\"", "x\n".repeat(10_000));
        let body = format!("{OWN_HEADER}\n{long}\n\n0,a,m\n{row}\n");
        let trace = read(Trickle(body.as_bytes()), &options()).unwrap();
        assert_eq!(lines_kept(&trace), [2, 10_005]);
        assert_eq!(trace.bad[0].line, 10_004);
    }

    fn azure_conversations(options: &Options) -> Trace {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/azure_llm_2023_conv.csv");
        read(std::fs::File::open(path).unwrap(), options).unwrap()
    }

    /// Rows per account index (of `acct-{k}`), over `accounts`.
    fn rows_per_account(trace: &Trace, accounts: usize) -> Vec<u64> {
        let mut counts = vec![0; accounts];
        for r in &trace.requests {
            let name = &trace.accounts[r.account as usize];
            counts[name.strip_prefix("acct-").unwrap().parse::<usize>().unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn priority_share_sends_that_fraction_on_the_priority_tier() {
        for share in [0.0, 0.2, 0.5, 1.0] {
            let trace = azure_conversations(&Options { priority_share: share, ..options() });
            let priority =
                trace.requests.iter().filter(|r| r.service_tier == ServiceTier::Priority).count() as f64;
            let got = priority / trace.requests.len() as f64;
            assert!((got - share).abs() < 0.02, "{share}: {got}");
        }
    }

    #[test]
    fn accounts_zipf_skews_the_spread_by_the_shares() {
        let zipf = Options { accounts: 10, accounts_zipf: Some(1.2), ..options() };
        let trace = azure_conversations(&zipf);
        assert_eq!(trace.requests.len(), 19_366);
        let counts = rows_per_account(&trace, 10);
        let weights: Vec<f64> = (1..=10).map(|k| f64::from(k).powf(-1.2)).collect();
        let total: f64 = weights.iter().sum();
        for (k, (&n, w)) in counts.iter().zip(&weights).enumerate() {
            let (got, want) = (n as f64 / 19_366.0, w / total);
            assert!((got - want).abs() < 0.02, "acct-{k}: {got:.3} of the rows, not {want:.3}: {counts:?}");
        }
        assert!(counts[1..].iter().all(|&n| n < counts[0]), "{counts:?}");
        assert!(counts[0] > 19_366 * 35 / 100, "{counts:?}"); // ~40.5%; uniform would be 10%
        // A steeper skew gives account 0 more.
        let steeper = azure_conversations(&Options { accounts_zipf: Some(3.0), ..zipf });
        assert!(rows_per_account(&steeper, 10)[0] > 19_366 * 80 / 100);
    }

    #[test]
    fn no_skew_or_a_skew_of_zero_spreads_as_before() {
        let uniform = Options { accounts: 7, ..options() };
        for o in [uniform.clone(), Options { accounts_zipf: Some(0.0), ..uniform }] {
            let trace = azure_conversations(&o);
            // As before real lines were counted: the file has CRLF line ends, so csv counted
            // one line less.
            for r in &trace.requests {
                assert_eq!(trace.accounts[r.account as usize], format!("acct-{}", mix(r.line - 1, 1) % 7));
            }
            let counts = rows_per_account(&trace, 7);
            assert!(counts.iter().all(|&n| (n as f64 / 19_366.0 - 1.0 / 7.0).abs() < 0.02), "{counts:?}");
        }
    }

    #[test]
    fn the_zipf_table_is_the_running_sum_of_the_shares() {
        let Spread::Zipf(cumulative) =
            Spread::new(&Options { accounts: 4, accounts_zipf: Some(1.0), ..options() }).unwrap()
        else {
            panic!("not zipf");
        };
        let total = 1.0 + 0.5 + 1.0 / 3.0 + 0.25;
        let want = [1.0 / total, 1.5 / total, (1.5 + 1.0 / 3.0) / total, 1.0];
        assert!(cumulative.iter().zip(want).all(|(c, w)| (c - w).abs() < 1e-12), "{cumulative:?}");
        let one = Spread::new(&Options { accounts: 1, accounts_zipf: Some(2.0), ..options() }).unwrap();
        assert!((0..1_000).all(|line| one.account(line) == 0));
        let huge = Options { accounts: MAX_ZIPF_ACCOUNTS + 1, accounts_zipf: Some(1.0), ..options() };
        assert!(matches!(Spread::new(&huge), Err(TraceError::Options(_))));
    }
}
