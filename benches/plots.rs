//! Renders the plots of `docs/benchmarks.md` from the result file the benches write
//! (`BENCH_RESULTS`, default `target/bench/results.jsonl`) into `BENCH_PLOTS` (default
//! `docs/bench`), and prints the tables of the page in Markdown:
//!
//! - `throughput.svg`: each consumer's rate as a share of the raw baseline of the same
//!   run (median over the rounds), by payload, RabbitMQ and NATS;
//! - `latency.svg`: publish → handler and publish → ack percentiles, the worker beside
//!   the raw loop, by broker and rate;
//! - `soak.svg`: resident memory and throughput over time in the soak.
//!
//! Each plot takes the latest run (`BENCH_RUN`) of its bench found in the file.
//!
//! ```text
//! cargo bench --bench plots        # after scripts/bench.sh, which runs it itself
//! ```

use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;

mod support;
use support::median;

type Fail = Box<dyn std::error::Error>;

/// The lines of the latest run of `bench` in the file.
fn latest(all: &[Value], bench: &str) -> Vec<Value> {
    let Some(run) = all
        .iter()
        .rev()
        .find(|v| v["bench"] == bench)
        .and_then(|v| v["run"].as_str())
    else {
        return Vec::new();
    };
    all.iter()
        .filter(|v| v["bench"] == bench && v["run"] == run)
        .cloned()
        .collect()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Per (payload, consumer): the median over rounds of rate ÷ the baseline's rate of the
/// same round and payload, and the medians of msgs/s and CPU.
struct Row {
    scenario: String,
    payload: u64,
    consumer: String,
    ratio: f64,
    rate: f64,
    client_cpu: f64,
    broker_cpu: f64,
}

fn ratios(lines: &[Value]) -> Vec<Row> {
    let key = |v: &Value| {
        (
            v["scenario"].as_str().unwrap_or("").to_owned(),
            v["payload"].as_u64().unwrap_or(0),
            v["round"].as_u64().unwrap_or(0),
        )
    };
    // (scenario, payload, consumer) → per round: ratio, msgs/s, client and broker CPU.
    type Rounds = Vec<(f64, f64, f64, f64)>;
    let mut groups: BTreeMap<(String, u64, String), Rounds> = BTreeMap::new();
    let mut order: Vec<(String, u64, String)> = Vec::new();
    for v in lines {
        let Some(base_name) = v["baseline"].as_str() else {
            continue;
        };
        let Some(base) = lines
            .iter()
            .find(|b| key(b) == key(v) && b["consumer"] == base_name)
        else {
            continue;
        };
        let consumer = v["consumer"].as_str().unwrap_or("").to_owned();
        let k = (key(v).0, key(v).1, consumer);
        if !order.contains(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push((
            f(v, "msgs_per_s") / f(base, "msgs_per_s"),
            f(v, "msgs_per_s"),
            f(v, "client_cpu_us"),
            f(v, "broker_cpu_us"),
        ));
    }
    order
        .into_iter()
        .map(|k| {
            let g = &groups[&k];
            let m = |i: usize| {
                median(
                    &g.iter()
                        .map(|t| [t.0, t.1, t.2, t.3][i])
                        .filter(|x| !x.is_nan())
                        .collect::<Vec<_>>(),
                )
            };
            Row {
                scenario: k.0.clone(),
                payload: k.1,
                consumer: k.2,
                ratio: m(0),
                rate: m(1),
                client_cpu: m(2),
                broker_cpu: m(3),
            }
        })
        .collect()
}

fn num(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.digits$}")
    }
}

fn throughput_table(title: &str, rows: &[Row], baseline: &str) {
    println!("\n{title} (ratio to `{baseline}` of the same round; medians)\n");
    println!(
        "| scenario | consumer | payload | msgs/s | × {baseline} | client CPU µs/msg | broker CPU µs/msg |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let payload = match r.payload {
            0 => "–".to_owned(),
            n => format!("{n} B"),
        };
        println!(
            "| {} | {} | {payload} | {} | {} | {} | {} |",
            r.scenario,
            r.consumer,
            num(r.rate, 0),
            num(r.ratio, 2),
            num(r.client_cpu, 1),
            num(r.broker_cpu, 1)
        );
    }
}

/// Grouped bars: one group per consumer, one bar per payload, ratio to the baseline.
fn throughput_plot(path: &str, panels: &[(&str, Vec<Row>)]) -> Result<(), Fail> {
    let root = SVGBackend::new(path, (900, 380 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, (title, rows)) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let consumers: Vec<&str> = rows.iter().fold(Vec::new(), |mut v, r| {
            if !v.contains(&r.consumer.as_str()) {
                v.push(r.consumer.as_str());
            }
            v
        });
        let payloads: Vec<u64> = rows.iter().fold(Vec::new(), |mut v, r| {
            if !v.contains(&r.payload) {
                v.push(r.payload);
            }
            v
        });
        let top = rows
            .iter()
            .map(|r| r.ratio)
            .filter(|x| x.is_finite())
            .fold(1.2_f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..consumers.len() as f64, 0.0..top)?;
        let names = consumers.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(consumers.len() * 2 + 1)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 {
                    names.get(i).map_or(String::new(), |s| (*s).to_owned())
                } else {
                    String::new()
                }
            })
            .y_desc("× raw baseline (same round)")
            .draw()?;
        let colors = [BLUE, RED, GREEN];
        for (pi, payload) in payloads.iter().enumerate() {
            let width = 0.8 / payloads.len() as f64;
            let color = colors[pi % colors.len()];
            chart
                .draw_series(rows.iter().filter(|r| r.payload == *payload).map(|r| {
                    let i = consumers.iter().position(|c| *c == r.consumer).unwrap_or(0) as f64;
                    let x0 = i + 0.1 + width * pi as f64;
                    Rectangle::new([(x0, 0.0), (x0 + width, r.ratio)], color.filled())
                }))?
                .label(format!("{payload} B"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart.draw_series(LineSeries::new(
            [(0.0, 1.0), (consumers.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        ))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

const PCTS: [(&str, &str); 5] = [
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p999", "p99.9"),
    ("max", "max"),
];

/// (transport, rate, consumer, to) → medians over rounds of each percentile (µs).
type Lat = BTreeMap<(String, u64, String, String), [f64; 5]>;

fn latencies(lines: &[Value]) -> Lat {
    let mut raw: BTreeMap<(String, u64, String, String), Vec<[f64; 5]>> = BTreeMap::new();
    for v in lines.iter().filter(|v| v["scenario"] == "latency") {
        let k = (
            v["transport"].as_str().unwrap_or("").to_owned(),
            v["rate"].as_u64().unwrap_or(0),
            v["consumer"].as_str().unwrap_or("").to_owned(),
            v["to"].as_str().unwrap_or("").to_owned(),
        );
        let p = PCTS.map(|(k, _)| v["latency_us"][k].as_f64().unwrap_or(f64::NAN));
        raw.entry(k).or_default().push(p);
    }
    raw.into_iter()
        .map(|(k, v)| {
            let m = std::array::from_fn(|i| median(&v.iter().map(|p| p[i]).collect::<Vec<_>>()));
            (k, m)
        })
        .collect()
}

fn latency_table(lat: &Lat) {
    println!("\nLatency from publish, µs (medians over rounds)\n");
    println!("| broker | rate | consumer | to | p50 | p90 | p99 | p99.9 | max | p99 ÷ raw |");
    println!("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((t, rate, c, to), p) in lat {
        let raw = lat.get(&(t.clone(), *rate, "raw".into(), to.clone()));
        let vs = raw.map_or("–".into(), |r| num(p[2] / r[2], 2));
        println!(
            "| {t} | {rate}/s | {c} | {to} | {} | {} | {} | {} | {} | {vs} |",
            num(p[0], 0),
            num(p[1], 0),
            num(p[2], 0),
            num(p[3], 0),
            num(p[4], 0)
        );
    }
}

fn latency_plot(path: &str, lat: &Lat) -> Result<(), Fail> {
    let panels: Vec<(String, u64)> = lat.keys().fold(Vec::new(), |mut v, k| {
        if !v.contains(&(k.0.clone(), k.1)) {
            v.push((k.0.clone(), k.1));
        }
        v
    });
    if panels.is_empty() {
        return Ok(());
    }
    let cols = 2.min(panels.len());
    let rows = panels.len().div_ceil(cols);
    let root = SVGBackend::new(path, (500 * cols as u32, 340 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, cols));
    for (area, (t, rate)) in areas.iter().zip(&panels) {
        let series: Vec<_> = lat
            .iter()
            .filter(|(k, _)| &k.0 == t && k.1 == *rate)
            .collect();
        let hi = series
            .iter()
            .flat_map(|(_, p)| p.iter())
            .copied()
            .filter(|x| x.is_finite())
            .fold(1000.0_f64, f64::max)
            / 1000.0;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{t}, {rate} msg/s"), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..4.0, (0.05..hi * 1.5).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&|x: &f64| {
                PCTS.get(x.round() as usize).map_or("", |p| p.1).to_owned()
            })
            .y_desc("ms")
            .draw()?;
        for (i, ((_, _, c, to), p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = if c == "raw" {
                color.stroke_width(2)
            } else {
                color.stroke_width(3)
            };
            chart
                .draw_series(LineSeries::new(
                    p.iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_finite())
                        .map(|(x, v)| (x as f64, v / 1000.0)),
                    style,
                ))?
                .label(format!("{c} → {to}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn soak_plot(path: &str, lines: &[Value]) -> Result<(), Fail> {
    let samples: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "sample").collect();
    if samples.is_empty() {
        return Ok(());
    }
    let whats: Vec<&str> = samples.iter().fold(Vec::new(), |mut v, s| {
        let w = s["transport"].as_str().unwrap_or("");
        if !v.contains(&w) {
            v.push(w);
        }
        v
    });
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(350);
    let tmax = samples.iter().map(|s| f(s, "t_s")).fold(1.0, f64::max);
    let series = |w: &str, k: &str, scale: f64| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter(|s| s["transport"] == w)
            .map(|s| (f(s, "t_s"), f(s, k) * scale))
            .collect()
    };
    for (area, key, scale, desc) in [
        (&upper, "rss_kib", 1.0 / 1024.0, "resident memory, MiB"),
        (
            &lower,
            "msgs_per_s",
            1.0,
            "messages/s (since the last sample)",
        ),
    ] {
        let top = whats
            .iter()
            .flat_map(|w| series(w, key, scale))
            .map(|p| p.1)
            .fold(1.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(desc, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..tmax, 0.0..top)?;
        chart.configure_mesh().x_desc("s").draw()?;
        for (i, w) in whats.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    series(w, key, scale),
                    color.stroke_width(2),
                ))?
                .label(*w)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    println!("\nSoak\n");
    println!(
        "| run | messages | seconds | msgs/s | RSS after warm-up | RSS at end | growth | last ÷ first minute |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in lines.iter().filter(|v| v["kind"] == "summary") {
        println!(
            "| {} | {} | {} | {} | {} MiB | {} MiB | {} % | {} |",
            s["transport"].as_str().unwrap_or(""),
            s["messages"],
            num(f(s, "seconds"), 0),
            num(f(s, "msgs_per_s"), 0),
            num(f(s, "rss_warm_kib") / 1024.0, 1),
            num(f(s, "rss_end_kib") / 1024.0, 1),
            num(f(s, "rss_growth_pct"), 1),
            num(f(s, "rate_ratio"), 2)
        );
    }
    Ok(())
}

fn main() -> Result<(), Fail> {
    // `cargo bench` passes `--bench`; nothing to parse.
    let path =
        std::env::var("BENCH_RESULTS").unwrap_or_else(|_| "target/bench/results.jsonl".into());
    let dir = std::env::var("BENCH_PLOTS").unwrap_or_else(|_| "docs/bench".into());
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let all: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(&dir)?;
    let mut panels = Vec::new();
    for (bench, title, baseline) in [
        ("amqp", "RabbitMQ: consume and ack", "raw-coalesced"),
        ("nats", "NATS JetStream: consume and ack", "raw-ack"),
    ] {
        let lines = latest(&all, bench);
        if lines.is_empty() {
            continue;
        }
        let rows = ratios(&lines);
        throughput_table(title, &rows, baseline);
        panels.push((title, rows));
    }
    for (bench, title, baseline) in [
        ("storage", "PostgreSQL inbox and outbox relay", "(per line)"),
        ("pipeline", "In-memory pipeline", "bare-transport"),
    ] {
        let lines = latest(&all, bench);
        if !lines.is_empty() {
            throughput_table(title, &ratios(&lines), baseline);
        }
    }
    if !panels.is_empty() {
        throughput_plot(&format!("{dir}/throughput.svg"), &panels)?;
    }
    let lat = latencies(&latest(&all, "latency"));
    if !lat.is_empty() {
        latency_table(&lat);
        latency_plot(&format!("{dir}/latency.svg"), &lat)?;
    }
    soak_plot(&format!("{dir}/soak.svg"), &latest(&all, "soak"))?;
    println!("\nplots in {dir}/");
    Ok(())
}
