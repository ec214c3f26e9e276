//! The workers' state on the console (decision 0121): read from each worker's operations
//! server (`/readyz` and `/metrics`, feature `http`) in the background, every few seconds,
//! so a page never waits on a worker. Plain HTTP to the addresses given with `--worker`;
//! only the host and port are ever shown, and a URL with a user or password is refused.

use super::CliError;
use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most a worker's answer may weigh.
const MAX_ANSWER: usize = 8 << 20;
/// How long one request to a worker may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One worker's operations server.
struct Target {
    /// `host:port`, as shown and connected to.
    addr: String,
}

/// A consumer group as one worker's operations server reports it.
#[derive(Debug, Clone, Default)]
pub(super) struct GroupState {
    pub(super) group: String,
    /// Whether `/readyz` says ready.
    pub(super) ready: bool,
    /// `running`, `draining`, `paused (kill switch open)`, ...
    pub(super) state: String,
    /// `Connected`, `Reconnecting`, `Closed`.
    pub(super) transport: String,
    /// Deliveries settled so far (acked, retried, dead-lettered, ...).
    pub(super) settled: Option<f64>,
    /// Deliveries being processed now.
    pub(super) in_flight: Option<f64>,
    /// Settled per second between the last two reads.
    pub(super) rate: Option<f64>,
}

/// The last read of one worker.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    /// `host:port` of its operations server.
    pub(super) addr: String,
    /// How long ago it was read.
    pub(super) age: Duration,
    /// Its groups, or why it could not be read.
    pub(super) groups: Result<Vec<GroupState>, String>,
}

struct Last {
    at: Instant,
    groups: Result<Vec<GroupState>, String>,
}

/// The workers the console watches and their last reads.
pub(super) struct Workers {
    targets: Vec<Target>,
    last: Mutex<HashMap<String, Last>>,
}

impl Workers {
    /// The operations servers at `urls` (`http://host:port`).
    pub(super) fn new(urls: &[String]) -> Result<Self, CliError> {
        let mut targets = Vec::new();
        for u in urls {
            let bad = |why: &str| CliError::new(format!("--worker: {why}"));
            let url = url::Url::parse(u).map_err(|e| bad(&e.to_string()))?;
            if url.scheme() != "http" {
                return Err(bad("only http:// (a worker's operations server)"));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(bad("a worker URL with a user or password is refused"));
            }
            let host = url.host_str().ok_or_else(|| bad("no host"))?;
            let port = url.port_or_known_default().unwrap_or(80);
            targets.push(Target {
                addr: format!("{host}:{port}"),
            });
        }
        Ok(Self {
            targets,
            last: Mutex::default(),
        })
    }

    /// Whether any worker is watched.
    pub(super) fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Reads every worker now and then every `every`, until the process ends.
    pub(super) fn spawn(self: &Arc<Self>, every: Duration) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let reads = me.targets.iter().map(|t| read(&t.addr));
                let all = futures::future::join_all(reads).await;
                let now = Instant::now();
                let mut last = me.last.lock().unwrap_or_else(|e| e.into_inner());
                for (t, groups) in me.targets.iter().zip(all) {
                    let groups = groups.map(|mut gs| {
                        if let Some(Last {
                            at,
                            groups: Ok(before),
                        }) = last.get(&t.addr)
                        {
                            let secs = now.duration_since(*at).as_secs_f64();
                            for g in &mut gs {
                                let prev = before.iter().find(|b| b.group == g.group);
                                if let (Some(now_n), Some(prev_n)) =
                                    (g.settled, prev.and_then(|p| p.settled))
                                    && secs > 0.0
                                    && now_n >= prev_n
                                {
                                    g.rate = Some((now_n - prev_n) / secs);
                                }
                            }
                        }
                        gs
                    });
                    last.insert(t.addr.clone(), Last { at: now, groups });
                }
            }
        });
    }

    /// The last read of every worker, in the order given.
    pub(super) fn seen(&self) -> Vec<Seen> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.targets
            .iter()
            .map(|t| match last.get(&t.addr) {
                Some(l) => Seen {
                    addr: t.addr.clone(),
                    age: l.at.elapsed(),
                    groups: l.groups.clone(),
                },
                None => Seen {
                    addr: t.addr.clone(),
                    age: Duration::ZERO,
                    groups: Err("not read yet".to_owned()),
                },
            })
            .collect()
    }
}

/// One worker's groups: their state from `/readyz`, their counts from `/metrics` (when it
/// serves them).
async fn read(addr: &str) -> Result<Vec<GroupState>, String> {
    let (_, ready) = get(addr, "/readyz").await?;
    let mut groups = parse_readyz(&ready);
    if let Ok((200, metrics)) = get(addr, "/metrics").await {
        add_metrics(&mut groups, &metrics);
    }
    Ok(groups)
}

/// `GET path` over HTTP/1.0: the status and the body.
async fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("asking: {e}"))?;
        let mut out = Vec::new();
        (&mut s)
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        Ok::<_, String>(out)
    };
    let out = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer to {path} within {REQUEST_TIMEOUT:?}"))??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{path}: not an HTTP answer"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{path}: not an HTTP answer"))?;
    Ok((status, body.to_owned()))
}

/// `/readyz` lines: `{group}: ready|not ready (state {state}, transport {health})`.
fn parse_readyz(body: &str) -> Vec<GroupState> {
    let mut out = Vec::new();
    for line in body.lines() {
        let Some((group, rest)) = line.split_once(": ") else {
            continue;
        };
        let Some((verdict, detail)) = rest.split_once(" (state ") else {
            continue;
        };
        let detail = detail.strip_suffix(')').unwrap_or(detail);
        let (state, transport) = detail.split_once(", transport ").unwrap_or((detail, ""));
        out.push(GroupState {
            group: group.to_owned(),
            ready: verdict == "ready",
            state: state.to_owned(),
            transport: transport.to_owned(),
            ..GroupState::default()
        });
    }
    out
}

/// Adds the settled and in-flight counts of the Prometheus text `metrics` to `groups`.
fn add_metrics(groups: &mut [GroupState], metrics: &str) {
    for line in metrics.lines() {
        let (settled, in_flight) = (
            line.starts_with("steadfast_worker_outcomes_total{"),
            line.starts_with("steadfast_worker_in_flight{"),
        );
        if !settled && !in_flight {
            continue;
        }
        let Some((labels, value)) = line.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let Some(group) = labels
            .split(['{', ','])
            .find_map(|l| l.strip_prefix("messaging_consumer_group_name=\""))
            .map(|g| g.trim_end_matches('"'))
        else {
            continue;
        };
        let Some(g) = groups.iter_mut().find(|g| g.group == group) else {
            continue;
        };
        if settled {
            g.settled = Some(g.settled.unwrap_or(0.0) + value);
        } else {
            g.in_flight = Some(value);
        }
    }
}

/// The workers page's body.
pub(super) fn render(seen: &[Seen], esc: impl Fn(&str) -> String) -> String {
    let mut body = String::from(
        "<table><tr><th>Worker</th><th>Consumer group</th><th>Ready</th><th>State</th>\
         <th>Connected</th><th>Consuming</th><th>Draining</th><th>Kill switch open</th>\
         <th>In flight</th><th>Settled</th><th>Settled/s</th><th>Read</th></tr>",
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    let num =
        |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    for s in seen {
        let read = format!("{:.1} s ago", s.age.as_secs_f64());
        match &s.groups {
            Err(e) => {
                let _ = write!(
                    body,
                    "<tr class=\"worker\"><td>{}</td><td colspan=\"10\" class=\"warn\">{}</td><td>{read}</td></tr>",
                    esc(&s.addr),
                    esc(e)
                );
            }
            Ok(gs) if gs.is_empty() => {
                let _ = write!(
                    body,
                    "<tr class=\"worker\"><td>{}</td><td colspan=\"10\">no worker watched there</td><td>{read}</td></tr>",
                    esc(&s.addr)
                );
            }
            Ok(gs) => {
                for g in gs {
                    let _ = write!(
                        body,
                        "<tr class=\"worker\"><td>{}</td><td class=\"group\">{}</td><td class=\"ready\">{}</td>\
                         <td class=\"state\">{}</td><td class=\"connected\">{}</td><td class=\"consuming\">{}</td>\
                         <td class=\"draining\">{}</td><td class=\"kill-switch\">{}</td><td>{}</td>\
                         <td class=\"settled\">{}</td><td class=\"rate\">{}</td><td>{read}</td></tr>",
                        esc(&s.addr),
                        esc(&g.group),
                        yes(g.ready),
                        esc(&g.state),
                        yes(g.transport == "Connected"),
                        yes(g.state == "running"),
                        yes(g.state == "draining"),
                        yes(g.state.starts_with("paused")),
                        num(g.in_flight, 0),
                        num(g.settled, 0),
                        num(g.rate, 1),
                    );
                }
            }
        }
    }
    body.push_str("</table>");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_readyz_and_metrics() {
        let mut gs = parse_readyz(
            "billing: ready (state running, transport Connected)\n\
             audit: not ready (state paused (kill switch open), transport Reconnecting)\n",
        );
        add_metrics(
            &mut gs,
            "# TYPE steadfast_worker_outcomes_total counter\n\
             steadfast_worker_outcomes_total{messaging_system=\"rabbitmq\",messaging_consumer_group_name=\"billing\",outcome=\"acked\"} 20\n\
             steadfast_worker_outcomes_total{messaging_system=\"rabbitmq\",messaging_consumer_group_name=\"billing\",outcome=\"dead_lettered\"} 3\n\
             steadfast_worker_in_flight{messaging_system=\"rabbitmq\",messaging_consumer_group_name=\"audit\"} 4\n",
        );
        assert_eq!(gs.len(), 2);
        assert!(gs[0].ready && gs[0].state == "running" && gs[0].transport == "Connected");
        assert_eq!(gs[0].settled, Some(23.0));
        assert!(!gs[1].ready);
        assert_eq!(gs[1].state, "paused (kill switch open)");
        assert_eq!(gs[1].transport, "Reconnecting");
        assert_eq!(gs[1].in_flight, Some(4.0));
    }

    #[test]
    fn refuses_credentials_and_other_schemes() {
        assert!(Workers::new(&["http://u:p@127.0.0.1:9090".to_owned()]).is_err());
        assert!(Workers::new(&["https://127.0.0.1:9090".to_owned()]).is_err());
        let w = Workers::new(&["http://127.0.0.1:9090/".to_owned()]).unwrap();
        assert_eq!(w.seen()[0].addr, "127.0.0.1:9090");
    }
}
