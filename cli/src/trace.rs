//! Traces: the Azure LLM inference trace 2023 and sluicegate's own CSV, told apart by their
//! header line (format: `docs/trace-format.md`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;

use sluicegate_core::ServiceTier;

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
    /// Rows skipped.
    pub bad: Vec<BadRow>,
    /// "azure" or "sluicegate".
    pub format: &'static str,
    /// Unix time of the first request, when the trace gives dates (Azure's do).
    pub start_unix_ns: Option<u64>,
}

/// Why a trace could not be read at all.
#[derive(Debug)]
pub enum TraceError {
    /// The file could not be read or is not CSV.
    Io(String),
    /// The header line is neither format's.
    UnknownFormat(String),
    /// `--strict` and a bad row.
    Bad(BadRow),
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

/// A parsed row before its names are numbered and its time made relative.
struct Row<'a> {
    t_ns: u64,
    account: Cow<'a, str>,
    model: Cow<'a, str>,
    request: TraceRequest,
}

/// Reads a trace from `input`.
pub fn read(input: impl Read, options: &Options) -> Result<Trace, TraceError> {
    let mut reader =
        csv::ReaderBuilder::new().has_headers(true).flexible(true).trim(csv::Trim::All).from_reader(input);
    let header =
        reader.headers().map_err(|e| TraceError::Io(e.to_string()))?.iter().collect::<Vec<_>>().join(",");
    let format = match header.as_str() {
        AZURE_HEADER => "azure",
        OWN_HEADER => "sluicegate",
        _ => return Err(TraceError::UnknownFormat(header)),
    };
    let mut trace = Trace {
        requests: Vec::new(),
        accounts: Vec::new(),
        models: Vec::new(),
        bad: Vec::new(),
        format,
        start_unix_ns: None,
    };
    let (mut accounts, mut models) = (Names::default(), Names::default());
    let mut origin = None;
    let mut last = 0u64;
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record);
        let line = record.position().map_or(0, csv::Position::line);
        let parsed = match more {
            Ok(false) => break,
            Ok(true) => {
                let fields: Vec<&str> = record.iter().collect();
                if format == "azure" { azure(&fields, line, options) } else { own(&fields, line) }
            }
            Err(e) => Err(e.to_string()),
        };
        let parsed = parsed.and_then(|row| {
            let origin = *origin.get_or_insert(row.t_ns);
            let t_ns = row.t_ns.checked_sub(origin).ok_or("timestamp before the first request")?;
            if t_ns < last {
                return Err(format!(
                    "timestamp out of order ({} ms after {} ms)",
                    t_ns / 1_000_000,
                    last / 1_000_000
                ));
            }
            let account = accounts.id(&row.account)?;
            let model = models.id(&row.model)?;
            Ok(TraceRequest { t_ns, account, model, ..row.request })
        });
        match parsed {
            Ok(r) => {
                last = r.t_ns;
                trace.requests.push(r);
            }
            Err(reason) => {
                let bad = BadRow { line, reason };
                if options.strict {
                    return Err(TraceError::Bad(bad));
                }
                trace.bad.push(bad);
            }
        }
    }
    trace.start_unix_ns = origin.filter(|_| format == "azure");
    trace.accounts = accounts.names;
    trace.models = models.names;
    Ok(trace)
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
/// max_tokens; the generated count is used as the reservation.
fn azure<'a>(fields: &[&'a str], line: u64, o: &'a Options) -> Result<Row<'a>, String> {
    let t = timestamp_ns(field(fields, 0, "TIMESTAMP")?)?;
    let prompt_tokens = count(fields, 1, "ContextTokens")?;
    let generated_tokens = count(fields, 2, "GeneratedTokens")?;
    let account = Cow::Owned(format!("acct-{}", mix(line, 1) % o.accounts.max(1)));
    let priority = (mix(line, 2) % 1_000_000) < (o.priority_share.clamp(0.0, 1.0) * 1e6) as u64;
    let service_tier = if priority { ServiceTier::Priority } else { ServiceTier::Default };
    let request = TraceRequest {
        line,
        t_ns: 0,
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
    Ok(Row { t_ns: t, account, model: Cow::Borrowed(&o.model), request })
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
        t_ns: 0,
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
    Ok(Row { t_ns: t_ms.saturating_mul(1_000_000), account: account.into(), model: model.into(), request })
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
}
