//! `steadfast console` (feature `console`): a small web console over the functions the
//! `dlq` commands use. Server-rendered HTML, no script, nothing loaded from outside the
//! machine (decision 0120).
//!
//! Secure by default: it listens on loopback unless `--allow-remote`; every page and
//! action needs the token (`STEADFAST_CONSOLE_TOKEN`, or `--token-file`), given as
//! `Authorization: Bearer …` or once on the login page, which sets an `HttpOnly`,
//! `SameSite=Strict` session cookie; every form that changes something carries the
//! session's CSRF token and is refused without it. The token is never logged or shown;
//! header values that look like secrets are shown as `***`, and the broker URL is never
//! rendered. Replay and purge take the same selectors as the CLI, have a dry run that lists
//! the ids, and are recorded in the audit trail; so do the outbox page's retry and delete
//! of parked rows. The workers page shows what the workers' operations servers report
//! (decision 0121).

use super::{
    CliError, DbArgs, audit,
    dlq::{outcome, select},
    print::{self, Groups},
};
use crate::{
    MessageId,
    envelope::header,
    transport::{DeadLetter, DeadLetterFilter, Transport},
};
use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header as h},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use clap::Args;
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

/// `steadfast console`: where to listen, which consumer groups, the token.
#[derive(Debug, Clone, Args)]
pub(super) struct ConsoleArgs {
    /// Address to listen on. Loopback unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// Listen on an address other than loopback (put TLS in front of it).
    #[arg(long)]
    allow_remote: bool,
    /// A consumer group to show (repeatable; at least one).
    #[arg(long = "group", required = true)]
    groups: Vec<String>,
    /// The outbox table whose parked rows the outbox page lists (in the database of
    /// --database-url or --sqlite).
    #[arg(long, default_value = "steadfast_outbox")]
    outbox_table: String,
    /// A file holding the access token (else `STEADFAST_CONSOLE_TOKEN`); at least 16
    /// characters.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// A worker's operations server (`http://host:port`, feature `http`) whose state and
    /// throughput the workers page shows (repeatable, or comma-separated in
    /// `STEADFAST_CONSOLE_WORKERS`).
    #[arg(
        long = "worker",
        env = "STEADFAST_CONSOLE_WORKERS",
        value_delimiter = ','
    )]
    workers: Vec<String>,
    /// How often the workers are read.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    worker_every: std::time::Duration,
    /// How old the failure groups page's read of every dead letter may be before the
    /// page asks for a new one (also read after each action; the page's totals are always
    /// the broker's current counts).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    index_every: std::time::Duration,
    /// How much of the dead letters (MiB, estimated) that read may keep for the pages of
    /// single dead letters, which answer from it without reading the queue or stream;
    /// the rest of them are read from the broker when asked for (0: keep none).
    #[arg(long, default_value_t = 128)]
    index_memory_mib: u64,
}

/// A login: its CSRF token.
type Sessions = Mutex<HashMap<String, String>>;

struct Console {
    transport: Arc<dyn Transport>,
    db: DbArgs,
    groups: Vec<String>,
    outbox_table: String,
    token: String,
    sessions: Sessions,
    workers: Arc<super::workers::Workers>,
    /// Each consumer group's failure groups, from the last full read.
    index: Index,
    index_every: std::time::Duration,
    /// `--index-memory-mib` in bytes.
    index_memory: u64,
}

/// The failure groups of each consumer group, read in full in the background (every
/// `--index-every`, and after every action) so the groups page never reads every dead
/// letter on a request: its rows come from the last read, its total from the broker's
/// count of the queue or stream.
#[derive(Default)]
struct Index {
    groups: Mutex<HashMap<String, Indexed>>,
    /// Woken to read again now (after an action).
    stale: tokio::sync::Notify,
    /// Woken after each read.
    fresh: tokio::sync::Notify,
    /// Counts the actions, so a read that began before one is known as stale.
    actions: std::sync::atomic::AtomicU64,
    /// Whether a read is under way (on RabbitMQ it holds what it has read until it ends).
    reading: std::sync::atomic::AtomicBool,
}

/// One consumer group's last read.
#[derive(Clone)]
struct Indexed {
    /// `Groups::json` of the read, or why it failed.
    rows: Result<serde_json::Value, String>,
    at: std::time::Instant,
    /// Whether an action happened since (the page waits briefly for a fresh read).
    stale: bool,
    /// The dead letters of the read by id, the first ones read up to the memory budget.
    letters: Arc<HashMap<MessageId, DeadLetter>>,
}

/// About how many bytes a kept dead letter takes: its strings, headers and body, and
/// the map entry around them.
fn footprint(d: &DeadLetter) -> u64 {
    let e = &d.envelope;
    let strings = e.name.len()
        + e.source.as_ref().map_or(0, String::len)
        + e.time.as_ref().map_or(0, String::len)
        + d.reason.len()
        + d.original_destination.len()
        + d.failed_at.len()
        + d.original_group.len();
    let headers: usize = e
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2 * std::mem::size_of::<String>())
        .sum();
    (std::mem::size_of::<(MessageId, DeadLetter)>() + 32 + strings + headers + e.payload.len())
        as u64
}

impl Console {
    /// Reads every consumer group's failure groups now, then again when an action makes
    /// them stale or the groups page finds them older than `--index-every`: nothing is
    /// read while nobody looks (on RabbitMQ a read holds the messages it has read).
    fn spawn_index(self: &Arc<Self>) {
        let c = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                c.index
                    .reading
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                for g in &c.groups {
                    let began = c.index.actions.load(std::sync::atomic::Ordering::SeqCst);
                    let mut groups = Groups::default();
                    let (mut letters, mut bytes, mut room) = (HashMap::new(), 0u64, true);
                    let rows = select(c.transport.as_ref(), g, &DeadLetterFilter::default(), |d| {
                        groups.add(&d);
                        if room {
                            bytes += footprint(&d);
                            room = bytes <= c.index_memory;
                            if room {
                                letters.entry(d.id()).or_insert(d);
                            }
                        }
                    })
                    .await
                    .map(|()| groups.json(g))
                    .map_err(|e| e.to_string());
                    c.index
                        .groups
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            g.clone(),
                            Indexed {
                                rows,
                                at: std::time::Instant::now(),
                                stale: began
                                    != c.index.actions.load(std::sync::atomic::Ordering::SeqCst),
                                letters: Arc::new(letters),
                            },
                        );
                }
                c.index
                    .reading
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                c.index.fresh.notify_waiters();
                c.index.stale.notified().await;
            }
        });
    }

    /// Marks the index stale after an action and asks for a read now.
    fn touched(&self) {
        self.index
            .actions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for i in self
            .index
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values_mut()
        {
            i.stale = true;
        }
        self.index.stale.notify_one();
    }

    /// `group`'s last read; if there is none yet or an action made it stale, waits up to
    /// two seconds for the next. A read older than `--index-every` is shown and a new
    /// one asked for.
    async fn indexed(&self, group: &str) -> Option<Indexed> {
        let now = || {
            self.index
                .groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(group)
                .cloned()
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let fresh = self.index.fresh.notified();
            match now() {
                Some(i) if !i.stale => {
                    if i.at.elapsed() > self.index_every {
                        self.index.stale.notify_one();
                    }
                    return Some(i);
                }
                last => {
                    if tokio::time::timeout_at(deadline, fresh).await.is_err() {
                        return last.or_else(now);
                    }
                }
            }
        }
    }
}

/// How a request proved it holds the token.
enum Auth {
    /// `Authorization: Bearer`: no ambient credential, so no CSRF token needed.
    Bearer,
    /// The session cookie: forms must carry this CSRF token.
    Session(String),
}

/// Runs the console until Ctrl-C or SIGTERM.
pub(super) async fn run(
    transport: Arc<dyn Transport>,
    db: DbArgs,
    args: ConsoleArgs,
) -> Result<std::process::ExitCode, CliError> {
    let token = match &args.token_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| CliError::new(format!("reading --token-file: {e}")))?,
        None => std::env::var("STEADFAST_CONSOLE_TOKEN").unwrap_or_default(),
    };
    let token = token.trim().to_owned();
    if token.len() < 16 {
        return Err(CliError::new(
            "the console needs a token of at least 16 characters: set STEADFAST_CONSOLE_TOKEN or pass --token-file",
        ));
    }
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        return Err(CliError::new(format!(
            "refusing to listen on {}: not a loopback address (pass --allow-remote, behind TLS)",
            args.listen
        )));
    }
    for g in &args.groups {
        transport
            .dead_letter_count(g)
            .await
            .map_err(|e| CliError::new(format!("group `{g}`: {e}")))?;
    }
    let workers = Arc::new(super::workers::Workers::new(&args.workers)?);
    if !workers.is_empty() {
        workers.spawn(args.worker_every);
    }
    let state = Arc::new(Console {
        transport,
        db,
        groups: args.groups,
        outbox_table: args.outbox_table,
        token,
        sessions: Mutex::default(),
        workers,
        index: Index::default(),
        index_every: args.index_every,
        index_memory: args.index_memory_mib.saturating_mul(1 << 20),
    });
    state.spawn_index();
    let app = Router::new()
        .route("/", get(index))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/g/{group}", get(group_page))
        .route("/g/{group}/dl/{id}", get(show))
        .route("/g/{group}/dl/{id}/edit", post(edit))
        .route("/history", get(history))
        .route("/outbox", get(outbox_page))
        .route("/workers", get(workers_page))
        .route("/outbox/retry", post(outbox_retry))
        .route("/outbox/delete", post(outbox_delete))
        .route("/g/{group}/replay", post(replay))
        .route("/g/{group}/purge", post(purge))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::new(format!("listening on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(e.to_string()))?;
    eprintln!("steadfast console on http://{addr}/");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| CliError::new(format!("serving: {e}")))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Equal in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Console {
    fn auth(&self, headers: &HeaderMap) -> Option<Auth> {
        if let Some(b) = headers
            .get(h::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return same(b.trim(), &self.token).then_some(Auth::Bearer);
        }
        let cookie = headers.get(h::COOKIE).and_then(|v| v.to_str().ok())?;
        let sid = cookie
            .split(';')
            .filter_map(|c| c.trim().strip_prefix("steadfast_session="))
            .next()?;
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .iter()
            .find(|(k, _)| same(k, sid))
            .map(|(_, csrf)| Auth::Session(csrf.clone()))
    }
}

/// A page with the console's security headers.
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} · steadfast</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:72em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}}\
         pre{{background:#f4f4f4;padding:.6em;overflow:auto}}form.inline{{display:inline}}\
         .warn{{color:#a00}}nav a{{margin-right:1em}}</style></head><body>\
         <nav><a href=\"/\">Failure groups</a><a href=\"/history\">Audit trail</a><a href=\"/outbox\">Outbox</a><a href=\"/workers\">Workers</a></nav><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    );
    let mut r = (status, html).into_response();
    let hd = r.headers_mut();
    hd.insert(
        h::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    hd.insert(
        h::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    hd.insert(h::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    hd.insert(h::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    hd.insert(h::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(h::LOCATION, v);
    }
    r
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn pct(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn form(body: &[u8]) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        m.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    m
}

fn one<'a>(f: &'a HashMap<String, Vec<String>>, k: &str) -> Option<&'a str> {
    f.get(k)
        .and_then(|v| v.first())
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The selectors of a query string or form, as the CLI's flags.
fn filter(f: &HashMap<String, Vec<String>>) -> Result<DeadLetterFilter, String> {
    let mut d = DeadLetterFilter::default();
    for id in f.get("id").into_iter().flatten().filter(|v| !v.is_empty()) {
        d.ids.push(
            id.parse::<MessageId>()
                .map_err(|_| format!("`{id}` is not a message id"))?,
        );
    }
    d.fingerprints = f
        .get("group_id")
        .into_iter()
        .flatten()
        .filter(|v| !v.is_empty())
        .cloned()
        .collect();
    d.name = one(f, "name").map(str::to_owned);
    d.reason = one(f, "reason").map(str::to_owned);
    if let Some(l) = one(f, "limit") {
        d.limit = Some(l.parse().map_err(|_| format!("`{l}` is not a number"))?);
    }
    if !d.ids.is_empty() {
        d.limit = Some(d.limit.unwrap_or(usize::MAX).min(d.ids.len()));
    }
    Ok(d)
}

/// The fields of a dead-letter selection.
const DEAD_LETTER_FIELDS: &[&str] = &["id", "group_id", "name", "reason", "limit"];
/// The fields of a parked-row selection.
const PARKED_FIELDS: &[&str] = &["id", "name", "error", "limit"];

/// Hidden fields that repeat a selection (its `keys`) in a form.
fn hidden_selection(f: &HashMap<String, Vec<String>>, keys: &[&str]) -> String {
    let mut o = String::new();
    for k in keys {
        for v in f.get(*k).into_iter().flatten().filter(|v| !v.is_empty()) {
            let _ = write!(
                o,
                "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
                esc(v)
            );
        }
    }
    o
}

fn csrf_field(auth: &Auth) -> String {
    match auth {
        Auth::Session(c) => format!("<input type=\"hidden\" name=\"csrf\" value=\"{c}\">"),
        Auth::Bearer => String::new(),
    }
}

fn unauthorized() -> Response {
    page(
        StatusCode::UNAUTHORIZED,
        "Token required",
        "<p>This action needs the console's token. <a href=\"/login\">Log in</a>.</p>",
    )
}

async fn login_form() -> Response {
    page(
        StatusCode::OK,
        "Log in",
        "<form method=\"post\" action=\"/login\"><label>Token <input type=\"password\" \
         name=\"token\" autocomplete=\"current-password\" autofocus></label> \
         <button>Log in</button></form>",
    )
}

async fn login(State(c): State<Arc<Console>>, body: Bytes) -> Response {
    let f = form(&body);
    if !one(&f, "token").is_some_and(|t| same(t.trim(), &c.token)) {
        return page(
            StatusCode::UNAUTHORIZED,
            "Log in",
            "<p class=\"warn\">Wrong token.</p><p><a href=\"/login\">Try again</a></p>",
        );
    }
    let (sid, csrf) = (random_token(), random_token());
    c.sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(sid.clone(), csrf);
    let mut r = redirect("/");
    if let Ok(v) = HeaderValue::from_str(&format!(
        "steadfast_session={sid}; HttpOnly; SameSite=Strict; Path=/"
    )) {
        r.headers_mut().insert(h::SET_COOKIE, v);
    }
    r
}

/// Why a state-changing request was refused.
enum Refused {
    NoToken,
    Csrf,
}

impl Refused {
    fn page(&self) -> Response {
        match self {
            Self::NoToken => unauthorized(),
            Self::Csrf => page(
                StatusCode::FORBIDDEN,
                "Refused",
                "<p class=\"warn\">The form's CSRF token is missing or wrong: reload the page and try again.</p>",
            ),
        }
    }
}

/// The auth of a state-changing request: the token, or a session and its CSRF token.
fn check_post(
    c: &Console,
    headers: &HeaderMap,
    f: &HashMap<String, Vec<String>>,
) -> Result<Auth, Refused> {
    match c.auth(headers) {
        None => Err(Refused::NoToken),
        Some(Auth::Bearer) => Ok(Auth::Bearer),
        Some(Auth::Session(csrf)) => {
            if one(f, "csrf").is_some_and(|t| same(t, &csrf)) {
                Ok(Auth::Session(csrf))
            } else {
                Err(Refused::Csrf)
            }
        }
    }
}

async fn logout(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form(&body);
    if let Err(r) = check_post(&c, &headers, &f) {
        return r.page();
    }
    if let Some(csrf) = one(&f, "csrf") {
        c.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, v| !same(v, csrf));
    }
    let mut r = redirect("/login");
    r.headers_mut().insert(
        h::SET_COOKIE,
        HeaderValue::from_static(
            "steadfast_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    r
}

/// One of the console's consumer groups, or the not-found page.
fn known<'a>(c: &'a Console, group: &str) -> Result<&'a str, Box<Response>> {
    c.groups
        .iter()
        .find(|g| *g == group)
        .map(String::as_str)
        .ok_or_else(|| {
            Box::new(page(
                StatusCode::NOT_FOUND,
                "Not found",
                "<p>No such consumer group here.</p>",
            ))
        })
}

/// The consumer group and its dead letter `id`, or the page saying why not (unknown
/// group, not an id, no such dead letter).
async fn dead_letter<'a>(
    c: &'a Console,
    group: &str,
    id: &str,
) -> Result<(&'a str, DeadLetter), Box<Response>> {
    let group = known(c, group)?;
    let Ok(mid) = id.parse::<MessageId>() else {
        return Err(Box::new(page(
            StatusCode::BAD_REQUEST,
            "Bad id",
            "<p>Not a message id.</p>",
        )));
    };
    let f = DeadLetterFilter {
        ids: vec![mid],
        limit: Some(1),
        ..DeadLetterFilter::default()
    };
    let reading = || c.index.reading.load(std::sync::atomic::Ordering::SeqCst);
    let ended = c.index.fresh.notified();
    let was_reading = reading();
    let mut found = None;
    if let Err(e) = select(c.transport.as_ref(), group, &f, |d| found = Some(d)).await {
        return Err(Box::new(error_page(&e)));
    }
    // On RabbitMQ the background read holds what it has read until it ends: a dead letter
    // not found while one ran is looked for again once it ended (waiting up to
    // `READ_WAIT`), in what it kept, then on the broker.
    if found.is_none() && (was_reading || reading()) {
        let _ = tokio::time::timeout(READ_WAIT, ended).await;
        if let Some((_, d, _)) = kept(c, group, id) {
            return Ok((group, d));
        }
        if let Err(e) = select(c.transport.as_ref(), group, &f, |d| found = Some(d)).await {
            return Err(Box::new(error_page(&e)));
        }
    }
    found.map(|d| (group, d)).ok_or_else(|| {
        Box::new(page(
            StatusCode::NOT_FOUND,
            "Not found",
            "<p>No dead letter with that id (replayed or purged?).</p>",
        ))
    })
}

/// How long a dead letter's page waits for the background read to end when the dead
/// letter was not found while it ran.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The dead letter `id` of `group` as the last background read kept it, with when that
/// read was made; none when it did not keep it or an action made it stale. A read older
/// than `--index-every` is used and a new one asked for, as the failure groups page does.
fn kept<'a>(
    c: &'a Console,
    group: &str,
    id: &str,
) -> Option<(&'a str, DeadLetter, std::time::Instant)> {
    let group = known(c, group).ok()?;
    let id = id.parse::<MessageId>().ok()?;
    let groups = c.index.groups.lock().unwrap_or_else(|e| e.into_inner());
    let read = groups.get(group).filter(|i| !i.stale)?;
    let d = read.letters.get(&id)?.clone();
    if read.at.elapsed() > c.index_every {
        c.index.stale.notify_one();
    }
    Some((group, d, read.at))
}

fn error_page(e: &CliError) -> Response {
    page(
        StatusCode::BAD_GATEWAY,
        "Error",
        &format!("<p class=\"warn\">{}</p>", esc(&e.to_string())),
    )
}

async fn index(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(auth) = c.auth(&headers) else {
        return redirect("/login");
    };
    let mut body = String::new();
    for g in &c.groups {
        let total = match c.transport.dead_letter_count(g).await {
            Ok(n) => n,
            Err(e) => return error_page(&CliError::new(format!("group `{g}`: {e}"))),
        };
        let _ = write!(
            body,
            "<h2>Consumer group <a href=\"/g/{}\">{}</a>: <span class=\"total\">{total}</span> dead letter(s)</h2>",
            pct(g),
            esc(g)
        );
        let rows = match c.indexed(g).await {
            None => {
                body.push_str("<p>Reading the dead letters for the failure groups…</p>");
                continue;
            }
            Some(Indexed { rows: Err(e), .. }) => {
                let _ = write!(body, "<p class=\"warn\">{}</p>", esc(&e));
                continue;
            }
            Some(Indexed {
                rows: Ok(v),
                at,
                stale,
                ..
            }) => {
                let _ = write!(
                    body,
                    "<p class=\"as-of\">Failure groups as read {:.0} s ago{}.</p>",
                    at.elapsed().as_secs_f64(),
                    if stale { " (reading again)" } else { "" }
                );
                v["groups"].as_array().cloned().unwrap_or_default()
            }
        };
        if rows.is_empty() {
            body.push_str("<p>No dead letters.</p>");
            continue;
        }
        body.push_str(
            "<table><tr><th>Failure group</th><th>Count</th><th>Kind</th><th>Message</th>\
             <th>Reason</th><th>First failed</th><th>Last failed</th><th>Actions</th></tr>",
        );
        for r in rows {
            let s = |k: &str| esc(r[k].as_str().unwrap_or_default());
            let fp = r["fingerprint"].as_str().unwrap_or_default();
            let _ = write!(
                body,
                "<tr class=\"failure-group\"><td><a href=\"/g/{gp}?group_id={fpp}\"><code>{fpe}</code></a></td>\
                 <td class=\"count\">{count}</td><td>{kind}</td><td>{name}</td><td>{reason}</td>\
                 <td>{first}</td><td>{last}</td><td>{actions}</td></tr>",
                gp = pct(g),
                fpp = pct(fp),
                fpe = esc(&fp[..fp.len().min(12)]),
                count = r["count"],
                kind = s("kind"),
                name = s("name"),
                reason = s("reason"),
                first = s("first_failed_at"),
                last = s("last_failed_at"),
                actions = actions(
                    g,
                    &auth,
                    &HashMap::from([("group_id".to_owned(), vec![fp.to_owned()])])
                ),
            );
        }
        body.push_str("</table>");
    }
    if let Auth::Session(_) = auth {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/logout\">{}<button>Log out</button></form>",
            csrf_field(&auth)
        );
    }
    page(StatusCode::OK, "Failure groups", &body)
}

/// Dry-run, replay and purge buttons for a selection.
fn actions(group: &str, auth: &Auth, sel: &HashMap<String, Vec<String>>) -> String {
    let (csrf, hidden, g) = (
        csrf_field(auth),
        hidden_selection(sel, DEAD_LETTER_FIELDS),
        pct(group),
    );
    format!(
        "<form class=\"inline\" method=\"post\" action=\"/g/{g}/replay\">{csrf}{hidden}\
         <input type=\"hidden\" name=\"dry_run\" value=\"1\"><button>Replay…</button></form> \
         <form class=\"inline\" method=\"post\" action=\"/g/{g}/purge\">{csrf}{hidden}\
         <input type=\"hidden\" name=\"dry_run\" value=\"1\"><button>Purge…</button></form>"
    )
}

async fn group_page(
    State(c): State<Arc<Console>>,
    Path(group): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(auth) = c.auth(&headers) else {
        return redirect("/login");
    };
    let group = match known(&c, &group) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let sel = form(q.unwrap_or_default().as_bytes());
    let mut f = match filter(&sel) {
        Ok(f) => f,
        Err(e) => return page(StatusCode::BAD_REQUEST, "Bad selection", &esc(&e)),
    };
    f.limit = Some(f.limit.unwrap_or(50));
    let mut all: Vec<DeadLetter> = Vec::new();
    if let Err(e) = select(c.transport.as_ref(), group, &f, |d| all.push(d)).await {
        return error_page(&e);
    }
    let v = |k: &str| esc(one(&sel, k).unwrap_or_default());
    let mut body = format!(
        "<form method=\"get\">Name <input name=\"name\" value=\"{}\"> Reason contains \
         <input name=\"reason\" value=\"{}\"> Failure group <input name=\"group_id\" value=\"{}\"> \
         Limit <input name=\"limit\" size=\"4\" value=\"{}\"> <button>Filter</button></form>\
         <p>{} dead letter(s) shown. {}</p><table><tr><th>Id</th><th>Message</th><th>Failed at</th>\
         <th>Attempts</th><th>Reason</th></tr>",
        v("name"),
        v("reason"),
        v("group_id"),
        v("limit"),
        all.len(),
        actions(group, &auth, &sel)
    );
    for d in &all {
        let id = d.id().to_string();
        let _ = write!(
            body,
            "<tr class=\"dead-letter\"><td><a href=\"/g/{}/dl/{id}\"><code>{id}</code></a></td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            pct(group),
            esc(&d.envelope.name),
            esc(&d.failed_at),
            d.attempts,
            esc(&d.reason)
        );
    }
    body.push_str("</table>");
    page(StatusCode::OK, &format!("Dead letters of {group}"), &body)
}

async fn show(
    State(c): State<Arc<Console>>,
    Path((group, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(auth) = c.auth(&headers) else {
        return redirect("/login");
    };
    let (group, d, kept_at) = match kept(&c, &group, &id) {
        Some((g, d, at)) => (g, d, Some(at)),
        None => match dead_letter(&c, &group, &id).await {
            Ok((g, d)) => (g, d, None),
            Err(r) => return *r,
        },
    };
    let j = print::show_json(&d);
    let mut body = String::from("<table>");
    for k in [
        "id",
        "name",
        "reason",
        "kind",
        "attempts",
        "original_destination",
        "failed_at",
    ] {
        let val = match &j[k] {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = write!(body, "<tr><th>{k}</th><td>{}</td></tr>", esc(&val));
    }
    body.push_str("</table>");
    if let Some(at) = kept_at {
        let _ = write!(
            body,
            "<p class=\"as-of\">As the console's background read found it {:.0} s ago; \
             the actions below act on the queue or stream as it is now.</p>",
            at.elapsed().as_secs_f64()
        );
    }
    body.push_str("<h2>Headers</h2><table>");
    for pair in j["headers"].as_array().into_iter().flatten() {
        let _ = write!(
            body,
            "<tr><th>{}</th><td>{}</td></tr>",
            esc(pair[0].as_str().unwrap_or_default()),
            esc(pair[1].as_str().unwrap_or_default())
        );
    }
    let _ = write!(
        body,
        "</table><h2>Body</h2><pre>{}</pre><p>{}</p>",
        esc(&print::body_text(&d.envelope.payload)),
        actions(
            group,
            &auth,
            &HashMap::from([("id".to_owned(), vec![id.clone()])])
        )
    );
    let _ = write!(
        body,
        "<h2>Edit and retry</h2><p>Sends the corrected message with a new id whose \
         <code>steadfast-replay-of</code> header names this one; this dead letter is removed \
         once the broker confirmed the copy.</p>\
         <form method=\"post\" action=\"/g/{}/dl/{id}/edit\">{}\
         <textarea name=\"body\" rows=\"8\" cols=\"80\">{}</textarea><br>\
         <button name=\"dry_run\" value=\"1\">Preview</button> \
         <button class=\"send\">Send the corrected message</button></form>",
        pct(group),
        csrf_field(&auth),
        esc(&String::from_utf8_lossy(&d.envelope.payload))
    );
    page(StatusCode::OK, &format!("Dead letter {id}"), &body)
}

async fn replay(
    State(c): State<Arc<Console>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    act(&c, &group, &headers, &body, "replay").await
}

async fn purge(
    State(c): State<Arc<Console>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    act(&c, &group, &headers, &body, "purge").await
}

/// Replay or purge: a dry run lists the ids and asks for confirmation; the confirmed form
/// acts, records the audit trail and reports.
async fn act(c: &Console, group: &str, headers: &HeaderMap, body: &[u8], verb: &str) -> Response {
    let f = form(body);
    let auth = match check_post(c, headers, &f) {
        Ok(a) => a,
        Err(r) => return r.page(),
    };
    let group = match known(c, group) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let sel = match filter(&f) {
        Ok(s) => s,
        Err(e) => return page(StatusCode::BAD_REQUEST, "Bad selection", &esc(&e)),
    };
    let t = c.transport.as_ref();
    if one(&f, "dry_run").is_some() {
        let mut ids = Vec::new();
        if let Err(e) = select(t, group, &sel, |d| ids.push(d.id())).await {
            return error_page(&e);
        }
        let mut body = format!(
            "<p>{verb} would touch <strong class=\"selected\">{}</strong> dead letter(s) of {}:</p><ul class=\"ids\">",
            ids.len(),
            esc(group)
        );
        for id in &ids {
            let _ = write!(body, "<li><code>{id}</code></li>");
        }
        let _ = write!(
            body,
            "</ul><form method=\"post\" action=\"/g/{}/{verb}\">{}{}<button class=\"confirm\">{verb} them</button></form>",
            pct(group),
            csrf_field(&auth),
            hidden_selection(&f, DEAD_LETTER_FIELDS)
        );
        return page(StatusCode::OK, &format!("Confirm {verb}"), &body);
    }
    let who = match &c.db.actor {
        Some(a) => a.clone(),
        None => "console".to_owned(),
    };
    let mut db = c.db.clone();
    db.actor = Some(who);
    let audit = match audit::begin(
        &db,
        verb,
        &format!("{}:{group}", t.system()),
        serde_json::json!({
            "ids": f.get("id"), "group_ids": f.get("group_id"), "name": one(&f, "name"),
            "reason": one(&f, "reason"), "limit": one(&f, "limit"), "via": "console",
        }),
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return error_page(&e),
    };
    let done = Mutex::new(Vec::new());
    let tick = |d: &DeadLetter| done.lock().unwrap_or_else(|e| e.into_inner()).push(d.id());
    let report = if verb == "replay" {
        let (actor, audit_id) = (audit.actor().to_owned(), audit.id().to_string());
        let rewrite = move |d: &DeadLetter| {
            let mut e = d.replay_envelope();
            e.headers.insert(header::REPLAYED_BY, actor.as_str());
            e.headers.insert(header::AUDIT_ID, audit_id.as_str());
            e
        };
        t.replay_dead_letters_as(group, &sel, &rewrite, &tick).await
    } else {
        t.purge_dead_letters(group, &sel, &tick).await
    };
    let ids = done.into_inner().unwrap_or_else(|e| e.into_inner());
    c.touched();
    if let Err(e) = audit.finish(&ids, outcome(&report)).await {
        return error_page(&e);
    }
    match report {
        Ok(r) => page(
            StatusCode::OK,
            &format!("Done: {verb}"),
            &format!(
                "<p class=\"outcome\">{verb}: <strong class=\"done\">{}</strong> of {} selected dead letter(s) of {} ({} failed).</p><p><a href=\"/\">Back</a></p>",
                r.done,
                r.selected,
                esc(group),
                r.failed
            ),
        ),
        Err(e) => error_page(&CliError::new(e.to_string())),
    }
}

/// Edit and retry one dead letter: its body replaced; the copy gets a new id and
/// `steadfast-replay-of`; the original is removed after the broker's confirm.
async fn edit(
    State(c): State<Arc<Console>>,
    Path((group, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = form(&body);
    if let Err(r) = check_post(&c, &headers, &f) {
        return r.page();
    }
    let (group, dl) = match dead_letter(&c, &group, &id).await {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let original = dl.id();
    let sel = DeadLetterFilter {
        ids: vec![original],
        limit: Some(1),
        ..DeadLetterFilter::default()
    };
    let t = c.transport.as_ref();
    let new_body = f
        .get("body")
        .and_then(|v| v.first())
        .map(|b| b.replace("\r\n", "\n"))
        .unwrap_or_default();
    if new_body.as_bytes() == dl.envelope.payload.as_ref() {
        return page(
            StatusCode::BAD_REQUEST,
            "Nothing changed",
            "<p>The body is the same: the dead letter stays as it is.</p>",
        );
    }
    let mut env = dl.replay_envelope();
    env.payload = bytes::Bytes::from(new_body.into_bytes());
    env.id = MessageId::new();
    env.headers
        .insert(header::REPLAY_OF, original.to_string().as_str());
    if one(&f, "dry_run").is_some() {
        return page(
            StatusCode::OK,
            "Preview",
            &format!(
                "<p>Would send this as <code class=\"new-id\">{}</code> in place of <code>{original}</code>; nothing changed.</p><pre>{}</pre>",
                env.id,
                esc(&print::body_text(&env.payload))
            ),
        );
    }
    let mut db = c.db.clone();
    db.actor = Some(db.actor.clone().unwrap_or_else(|| "console".to_owned()));
    let audit = match audit::begin(
        &db,
        "edit",
        &format!("{}:{group}", t.system()),
        serde_json::json!({
            "id": original.to_string(), "new_id": env.id.to_string(),
            "body_changed": true, "via": "console",
        }),
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return error_page(&e),
    };
    env.headers.insert(header::REPLAYED_BY, audit.actor());
    env.headers
        .insert(header::AUDIT_ID, audit.id().to_string().as_str());
    let rewrite = |d: &DeadLetter| {
        if d.id() == original {
            env.clone()
        } else {
            d.replay_envelope()
        }
    };
    let report = t
        .replay_dead_letters_as(group, &sel, &rewrite, &|_| {})
        .await;
    let ok = matches!(&report, Ok(r) if r.done == 1);
    let mut out = outcome(&report);
    out["new_id"] = env.id.to_string().into();
    let done: &[MessageId] = if ok { &[original] } else { &[] };
    c.touched();
    if let Err(e) = audit.finish(done, out).await {
        return error_page(&e);
    }
    if ok {
        page(
            StatusCode::OK,
            "Sent",
            &format!(
                "<p class=\"outcome\">Sent the corrected message as <code class=\"new-id\">{}</code> (replay of {original}); the dead letter is removed.</p><p><a href=\"/\">Back</a></p>",
                env.id
            ),
        )
    } else {
        let why = match &report {
            Ok(r) => r.first_error.clone().unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        error_page(&CliError::new(format!(
            "the corrected message was not confirmed; dead letter {original} stays: {why}"
        )))
    }
}

/// The audit trail: every replay, purge and edit, newest first.
async fn history(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if c.auth(&headers).is_none() {
        return redirect("/login");
    }
    let rows = match audit::records(&c.db, None, 100).await {
        Ok(r) => r,
        Err(e) => {
            return page(
                StatusCode::OK,
                "Audit trail",
                &format!("<p>{}</p>", esc(&e.to_string())),
            );
        }
    };
    let mut body = String::from(
        "<table><tr><th>At</th><th>Action</th><th>Target</th><th>By</th><th>Ids</th>\
         <th>Selection</th><th>Outcome</th></tr>",
    );
    for (id, at, actor, action, target, sel, ids, out) in &rows {
        let n = serde_json::from_str::<serde_json::Value>(ids)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        let _ = write!(
            body,
            "<tr class=\"audit\" title=\"{}\"><td>{}</td><td class=\"action\">{}</td><td>{}</td>\
             <td>{}</td><td>{n}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            esc(id),
            esc(at),
            esc(action),
            esc(target),
            esc(actor),
            esc(sel),
            esc(out)
        );
    }
    body.push_str("</table>");
    page(StatusCode::OK, "Audit trail", &body)
}

/// The outbox: pending and parked counts, the parked rows with their last errors (filtered
/// by name and error), and retry or delete buttons per row and for the selection.
async fn outbox_page(
    State(c): State<Arc<Console>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(auth) = c.auth(&headers) else {
        return redirect("/login");
    };
    let sel = form(q.unwrap_or_default().as_bytes());
    let select = match parked_filter(&sel) {
        Ok(s) => s,
        Err(e) => return page(StatusCode::BAD_REQUEST, "Bad selection", &esc(&e)),
    };
    let (status, rows) = match super::outbox::overview(&c.db, &c.outbox_table).await {
        Ok(r) => r,
        Err(e) => {
            return page(
                StatusCode::OK,
                "Outbox",
                &format!("<p>{}</p>", esc(&e.to_string())),
            );
        }
    };
    let rows: Vec<_> = rows.into_iter().filter(|r| select.matches(r)).collect();
    let v = |k: &str| esc(one(&sel, k).unwrap_or_default());
    let mut body = format!(
        "<p>Table <code>{}</code>: <strong class=\"pending\">{}</strong> pending, \
         <strong class=\"parked\">{}</strong> parked.</p>\
         <form method=\"get\">Message <input name=\"name\" value=\"{}\"> Error contains \
         <input name=\"error\" value=\"{}\"> <button>Filter</button></form>\
         <p>{} parked row(s) shown. {}</p><table><tr><th>Id</th><th>Message</th>\
         <th>Attempts</th><th>Last error</th><th>Actions</th></tr>",
        esc(&c.outbox_table),
        status.pending,
        status.parked,
        v("name"),
        v("error"),
        rows.len(),
        if rows.is_empty() {
            String::new()
        } else {
            parked_actions(&auth, &sel)
        }
    );
    for r in &rows {
        let _ = write!(
            body,
            "<tr class=\"parked-row\"><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.id,
            esc(&r.name),
            r.attempts,
            esc(&r.error),
            parked_actions(
                &auth,
                &HashMap::from([("id".to_owned(), vec![r.id.to_string()])])
            )
        );
    }
    body.push_str("</table>");
    page(StatusCode::OK, "Outbox", &body)
}

/// The parked-row selection of a query string or form, as the CLI's flags.
fn parked_filter(f: &HashMap<String, Vec<String>>) -> Result<super::outbox::ParkedArgs, String> {
    let mut ids = Vec::new();
    for id in f.get("id").into_iter().flatten().filter(|v| !v.is_empty()) {
        ids.push(
            id.parse::<MessageId>()
                .map_err(|_| format!("`{id}` is not a row id"))?,
        );
    }
    let limit = match one(f, "limit") {
        Some(l) => Some(l.parse().map_err(|_| format!("`{l}` is not a number"))?),
        None => None,
    };
    Ok(super::outbox::ParkedArgs {
        ids,
        name: one(f, "name").map(str::to_owned),
        error: one(f, "error").map(str::to_owned),
        limit,
    })
}

/// Retry and delete buttons (each a dry run first) for a parked-row selection.
fn parked_actions(auth: &Auth, sel: &HashMap<String, Vec<String>>) -> String {
    let (csrf, hidden) = (csrf_field(auth), hidden_selection(sel, PARKED_FIELDS));
    format!(
        "<form class=\"inline\" method=\"post\" action=\"/outbox/retry\">{csrf}{hidden}\
         <input type=\"hidden\" name=\"dry_run\" value=\"1\"><button>Retry…</button></form> \
         <form class=\"inline\" method=\"post\" action=\"/outbox/delete\">{csrf}{hidden}\
         <input type=\"hidden\" name=\"dry_run\" value=\"1\"><button>Delete…</button></form>"
    )
}

async fn outbox_retry(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    outbox_act(&c, &headers, &body, false).await
}

async fn outbox_delete(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    outbox_act(&c, &headers, &body, true).await
}

/// Retry or delete parked rows: a dry run lists the rows and asks for confirmation; the
/// confirmed form acts, records the audit trail (as the CLI's `retry-parked` /
/// `delete-parked`) and reports.
async fn outbox_act(c: &Console, headers: &HeaderMap, body: &[u8], delete: bool) -> Response {
    let f = form(body);
    let auth = match check_post(c, headers, &f) {
        Ok(a) => a,
        Err(r) => return r.page(),
    };
    let select = match parked_filter(&f) {
        Ok(s) => s,
        Err(e) => return page(StatusCode::BAD_REQUEST, "Bad selection", &esc(&e)),
    };
    let (action, verb, path) = if delete {
        ("delete-parked", "delete", "delete")
    } else {
        ("retry-parked", "retry", "retry")
    };
    let dry_run = one(&f, "dry_run").is_some();
    let mut db = c.db.clone();
    db.actor = Some(db.actor.clone().unwrap_or_else(|| "console".to_owned()));
    let selection = serde_json::json!({
        "ids": f.get("id"), "name": one(&f, "name"), "error": one(&f, "error"),
        "limit": one(&f, "limit"), "via": "console",
    });
    let (rows, done) = match super::outbox::console_act(
        &db,
        &c.outbox_table,
        &select,
        (!dry_run).then_some((action, delete)),
        selection,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return error_page(&e),
    };
    let table = esc(&c.outbox_table);
    let Some(done) = done else {
        let mut body = format!(
            "<p>{verb} would touch <strong class=\"selected\">{}</strong> parked row(s) of \
             <code>{table}</code>:</p><table><tr><th>Id</th><th>Message</th><th>Last error</th></tr>",
            rows.len()
        );
        for r in &rows {
            let _ = write!(
                body,
                "<tr class=\"parked-row\"><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                r.id,
                esc(&r.name),
                esc(&r.error)
            );
        }
        let _ = write!(
            body,
            "</table><form method=\"post\" action=\"/outbox/{path}\">{}{}<button class=\"confirm\">{verb} them</button></form>",
            csrf_field(&auth),
            hidden_selection(&f, PARKED_FIELDS)
        );
        return page(StatusCode::OK, &format!("Confirm {verb}"), &body);
    };
    let mut body = format!(
        "<p class=\"outcome\">{action}: <strong class=\"done\">{}</strong> of {} selected parked row(s) of <code>{table}</code>.</p>",
        done.done.len(),
        rows.len(),
    );
    if !done.missed.is_empty() {
        body.push_str("<p class=\"warn\">Not parked (unknown, pending or sent):</p><ul>");
        for id in &done.missed {
            let _ = write!(body, "<li><code>{id}</code></li>");
        }
        body.push_str("</ul>");
    }
    body.push_str("<p><a href=\"/outbox\">Back</a></p>");
    page(StatusCode::OK, &format!("Done: {verb}"), &body)
}

/// Each watched worker's consumer groups: ready, state, connected, consuming, draining,
/// kill switch, in flight, settled and settled per second, from its last read.
async fn workers_page(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if c.auth(&headers).is_none() {
        return redirect("/login");
    }
    if c.workers.is_empty() {
        return page(
            StatusCode::OK,
            "Workers",
            "<p>No worker is watched: start the console with <code>--worker \
             http://host:port</code> (a worker's operations server) or \
             <code>STEADFAST_CONSOLE_WORKERS</code>.</p>",
        );
    }
    let body = super::workers::render(&c.workers.seen(), esc);
    page(StatusCode::OK, "Workers", &body)
}
