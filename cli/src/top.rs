//! `sluicegate top`: a live view of a shared-memory engine from a process that serves nothing.
//! The region's file is mapped read-only, so the view cannot write to it, and it takes no lock:
//! the serving processes never wait for it.

use std::fs::File;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluicegate_core::inspect::{Inspector, ScopeView};
use sluicegate_core::metrics::{Event, ModelMetrics};
use sluicegate_core::{Metric, ServiceTier, Variant};

/// One reading of the region.
pub struct Snapshot {
    /// Scopes, busiest first: most of their requests limit used, then most in flight.
    pub scopes: Vec<ScopeView>,
    /// Model variants with any counter.
    pub models: Vec<ModelMetrics>,
}

/// The region's file, mapped for reading.
pub struct Region {
    map: memmap2::Mmap,
}

impl Region {
    /// Maps `path` read-only and checks it is a ready region.
    pub fn open(path: &str) -> Result<Region, String> {
        let file = File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
        // SAFETY: the serving processes change the file under the map; every read goes through
        // the inspector, which reads it as the atomics it holds and writes nothing.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot map {path}: {e}"))?;
        let region = Region { map };
        region.inspector().map_err(|e| format!("{path}: {e}"))?;
        Ok(region)
    }

    fn inspector(&self) -> Result<Inspector<'_>, sluicegate_core::RegionError> {
        let base =
            NonNull::new(self.map.as_ptr().cast_mut()).ok_or(sluicegate_core::RegionError::NotARegion)?;
        // SAFETY: the map is readable for its length while `self` lives; the inspector only reads.
        unsafe { Inspector::open(base, self.map.len()) }
    }

    /// Reads every scope and model now.
    pub fn read(&self, now_ns: u64) -> Result<Snapshot, String> {
        let inspector = self.inspector().map_err(|e| e.to_string())?;
        let mut scopes = Vec::new();
        inspector.for_each_scope(now_ns, |s| scopes.push(*s));
        scopes.sort_by(|a, b| busy(b).cmp(&busy(a)).then(b.in_flight.cmp(&a.in_flight)));
        let mut models = Vec::new();
        inspector.for_each_model_metrics(|m| models.push(m.clone()));
        Ok(Snapshot { scopes, models })
    }
}

/// How much of its requests limit a scope has used, in millionths.
fn busy(s: &ScopeView) -> u64 {
    let limit = s.levels.limit(Metric::Requests);
    if limit == 0 || limit == u64::MAX {
        return 0;
    }
    let used = limit.saturating_sub(s.levels.remaining(Metric::Requests));
    (u128::from(used) * 1_000_000 / u128::from(limit)) as u64
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A model id as every surface names it (`metrics::write_model_text`).
fn model_text(bytes: &[u8]) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = sluicegate_core::metrics::write_model_text(&mut out, bytes);
    out
}

fn variant(v: Variant) -> &'static str {
    match v {
        Variant::Regular => "regular",
        Variant::Fast => "fast",
    }
}

/// Every event's count over tiers and models.
fn totals(models: &[ModelMetrics]) -> Vec<(Event, u64)> {
    Event::ALL.into_iter().map(|e| (e, models.iter().map(|m| m.total(&[e])).sum())).collect()
}

/// The four 429s.
const RATE_LIMITED: [Event; 4] = [
    Event::RateLimitedRequests,
    Event::RateLimitedPromptTokens,
    Event::RateLimitedUncachedPromptTokens,
    Event::RateLimitedGeneratedTokens,
];

/// Requests refused (429, 503, spend, concurrency) and admitted over limit, over tiers.
fn refused_and_over(m: &ModelMetrics) -> (u64, u64) {
    let others = [Event::Shed, Event::SpendRefused, Event::ConcurrencyLimited];
    (m.total(&RATE_LIMITED) + m.total(&others), m.total(&[Event::AdmittedOverLimit]))
}

/// One snapshot as JSON, for scripts (`--once --json`).
pub fn to_json(s: &Snapshot, limit: usize) -> Value {
    let per_metric = |f: &dyn Fn(Metric) -> u64| -> Value {
        Metric::ALL
            .iter()
            .map(|m| (m.name().to_string(), json!(f(*m))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let scopes: Vec<Value> = s
        .scopes
        .iter()
        .take(limit)
        .map(|v| {
            json!({
                "account": text(v.account()),
                "model": model_text(v.model()),
                "variant": variant(v.variant),
                "in_flight": v.in_flight,
                "limits": per_metric(&|m| v.levels.limit(m)),
                "remaining": per_metric(&|m| v.levels.remaining(m)),
            })
        })
        .collect();
    let models: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            let counts: serde_json::Map<String, Value> = ServiceTier::ALL
                .iter()
                .map(|t| {
                    let mut tier: serde_json::Map<String, Value> =
                        Event::ALL.iter().map(|e| (e.name().to_string(), json!(m.count(*t, *e)))).collect();
                    tier.insert("spend_microdollars".into(), json!(m.spend_micros(*t)));
                    (t.name().to_string(), Value::Object(tier))
                })
                .collect();
            json!({
                "model": model_text(m.model()),
                "variant": variant(m.variant),
                "in_flight": m.in_flight,
                "load": f64::from(m.load) / 1000.0,
                "counts": counts,
            })
        })
        .collect();
    let totals: serde_json::Map<String, Value> =
        totals(&s.models).into_iter().map(|(e, n)| (e.name().to_string(), json!(n))).collect();
    json!({ "scopes": scopes, "scope_count": s.scopes.len(), "models": models, "totals": totals })
}

/// The interactive view: redrawn every `interval` until `q`, Esc or Ctrl-C.
pub fn run(region: &Region, interval: Duration, limit: usize) -> Result<(), String> {
    use ratatui::crossterm::event::{self, Event as Input, KeyCode, KeyModifiers};
    let mut terminal = ratatui::try_init().map_err(|e| format!("terminal: {e}"))?;
    let mut previous: Option<(Instant, Vec<ModelMetrics>)> = None;
    let result = loop {
        let snapshot = match region.read(sluicegate_core::clock::now_ns()) {
            Ok(s) => s,
            Err(e) => break Err(e),
        };
        let rates =
            previous.as_ref().map(|(at, models)| (at.elapsed().as_secs_f64().max(1e-3), models.clone()));
        if let Err(e) = terminal.draw(|frame| draw(frame, &snapshot, rates.as_ref(), limit)) {
            break Err(format!("terminal: {e}"));
        }
        previous = Some((Instant::now(), snapshot.models));
        let deadline = Instant::now() + interval;
        let mut quit = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match event::poll(left) {
                Ok(true) => {
                    if let Ok(Input::Key(k)) = event::read() {
                        let ctrl_c =
                            k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                        quit = matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c;
                    }
                    if quit {
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => return Err(format!("terminal: {e}")),
            }
        }
        if quit {
            break Ok(());
        }
    };
    ratatui::restore();
    result
}

fn draw(
    frame: &mut ratatui::Frame<'_>,
    s: &Snapshot,
    rates: Option<&(f64, Vec<ModelMetrics>)>,
    limit: usize,
) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::widgets::{Block, Paragraph, Row, Table};

    let [head, scopes, models] =
        Layout::vertical([Constraint::Length(3), Constraint::Fill(2), Constraint::Fill(1)])
            .areas(frame.area());
    let total = |events: &[Event]| -> u64 { s.models.iter().map(|m| m.total(events)).sum() };
    let line = format!(
        "{} scopes · admitted {} · over limit {} · 429 {} · 503 {} · spend/concurrency refused {} · expired {}   (q quits)",
        s.scopes.len(),
        total(&[Event::Admitted]),
        total(&[Event::AdmittedOverLimit]),
        total(&RATE_LIMITED),
        total(&[Event::Shed]),
        total(&[Event::SpendRefused, Event::ConcurrencyLimited]),
        total(&[Event::Expired]),
    );
    frame.render_widget(Paragraph::new(line).block(Block::bordered().title(" sluicegate top ")), head);

    let bold = Style::default().add_modifier(Modifier::BOLD);
    let header =
        Row::new(["account", "model", "variant", "in flight", "requests", "prompt", "uncached", "generated"])
            .style(bold);
    let level = |v: &ScopeView, m: Metric| {
        let l = v.levels.limit(m);
        if l == u64::MAX { "off".to_string() } else { format!("{}/{l}", v.levels.remaining(m)) }
    };
    let rows = s.scopes.iter().take(limit).map(|v| {
        Row::new([
            text(v.account()),
            model_text(v.model()),
            variant(v.variant).to_string(),
            v.in_flight.to_string(),
            level(v, Metric::Requests),
            level(v, Metric::PromptTokens),
            level(v, Metric::UncachedPromptTokens),
            level(v, Metric::GeneratedTokens),
        ])
    });
    let widths = [
        Constraint::Fill(3),
        Constraint::Fill(3),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Fill(2),
        Constraint::Fill(2),
        Constraint::Fill(2),
        Constraint::Fill(2),
    ];
    let title = " busiest scopes (remaining/limit per minute) ";
    frame
        .render_widget(Table::new(rows, widths).header(header).block(Block::bordered().title(title)), scopes);

    let header = Row::new(["model", "variant", "load", "in flight", "admitted", "over limit/s", "refused/s"])
        .style(bold);
    let rows = s.models.iter().filter(|m| !m.model().is_empty()).map(|m| {
        let (refused, over) = refused_and_over(m);
        let (over_rate, refused_rate) = match rates.and_then(|(secs, before)| {
            before.iter().find(|b| b.model() == m.model() && b.variant == m.variant).map(|b| (secs, b))
        }) {
            Some((secs, b)) => {
                let (refused_before, over_before) = refused_and_over(b);
                let per_s = |now: u64, then: u64| format!("{:.1}", now.saturating_sub(then) as f64 / secs);
                (per_s(over, over_before), per_s(refused, refused_before))
            }
            None => ("-".into(), "-".into()),
        };
        let admitted = m.total(&[Event::Admitted]);
        Row::new([
            model_text(m.model()),
            variant(m.variant).to_string(),
            format!("{:.2}", f64::from(m.load) / 1000.0),
            m.in_flight.to_string(),
            admitted.to_string(),
            over_rate,
            refused_rate,
        ])
    });
    let widths = [
        Constraint::Fill(3),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(13),
        Constraint::Length(10),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(header).block(Block::bordered().title(" models ")),
        models,
    );
}
