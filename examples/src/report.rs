//! The picture of a demo run: a self-contained HTML page (inline SVG, no scripts, no
//! external files) with records per second and the group's lag over time, the rolling
//! restart marked, records per pod, and the run's summary. `make demo` writes it and prints
//! where it is; charts are drawn with `plotters`' SVG backend.

use plotters::prelude::*;

/// One second of the demo, as the order service saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the first order was published.
    pub t: f64,
    pub produced: u64,
    /// Distinct orders the inventory pods reported processed.
    pub delivered: u64,
    /// The group's lag read from Kafka (committed vs log end), `None` when it could not be read.
    pub lag: Option<i64>,
}

/// What the report shows.
#[derive(Clone, Debug, Default)]
pub struct DemoRun {
    pub samples: Vec<Sample>,
    /// When the rolling restart began and (if it did) finished, in seconds since the start.
    pub restart: Option<(f64, Option<f64>)>,
    /// Orders processed per pod (pods of both generations).
    pub per_pod: Vec<(String, u64)>,
    pub orders: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub elapsed: f64,
}

/// Records per second between consecutive samples: `(t, rate)` at each sample's time.
pub fn rates(samples: &[Sample]) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].t - w[0].t;
            (dt > 0.0).then(|| {
                (
                    w[1].t,
                    w[1].delivered.saturating_sub(w[0].delivered) as f64 / dt,
                )
            })
        })
        .collect()
}

fn chart_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the report: {e:?}")
}

/// The throughput and lag chart as an SVG document.
pub fn timeline_svg(run: &DemoRun) -> anyhow::Result<String> {
    let rates = rates(&run.samples);
    let lags: Vec<(f64, f64)> = run
        .samples
        .iter()
        .filter_map(|s| s.lag.filter(|l| *l >= 0).map(|l| (s.t, l as f64)))
        .collect();
    let t_max = run.samples.last().map_or(1.0, |s| s.t).max(1.0);
    let rate_max = rates.iter().map(|r| r.1).fold(1.0, f64::max) * 1.15;
    let lag_max = lags.iter().map(|l| l.1).fold(1.0, f64::max) * 1.15;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Orders processed per second and the group's lag",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .right_y_label_area_size(60)
            .build_cartesian_2d(0f64..t_max, 0f64..rate_max)
            .map_err(chart_error)?
            .set_secondary_coord(0f64..t_max, 0f64..lag_max);
        chart
            .configure_mesh()
            .x_desc("seconds since the first order")
            .y_desc("orders per second")
            .light_line_style(WHITE)
            .draw()
            .map_err(chart_error)?;
        chart
            .configure_secondary_axes()
            .y_desc("lag (records)")
            .draw()
            .map_err(chart_error)?;
        if let Some((from, to)) = run.restart {
            let to = to.unwrap_or(t_max);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(from, 0.0), (to, rate_max)],
                    RGBColor(255, 170, 60).mix(0.25).filled(),
                )))
                .map_err(chart_error)?
                .label("rolling restart")
                .legend(|(x, y)| {
                    Rectangle::new(
                        [(x, y - 5), (x + 20, y + 5)],
                        RGBColor(255, 170, 60).mix(0.5).filled(),
                    )
                });
        }
        chart
            .draw_series(LineSeries::new(rates, BLUE.stroke_width(2)))
            .map_err(chart_error)?
            .label("orders processed per second")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_secondary_series(LineSeries::new(lags, RED.stroke_width(2)))
            .map_err(chart_error)?
            .label("lag (right axis)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// The records-per-pod bar chart as an SVG document.
pub fn pods_svg(run: &DemoRun) -> anyhow::Result<String> {
    let n = run.per_pod.len().max(1) as u32;
    let max = run.per_pod.iter().map(|p| p.1).max().unwrap_or(1).max(1) as f64 * 1.15;
    let names: Vec<String> = run.per_pod.iter().map(|p| p.0.clone()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Orders processed per pod", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0u32..n - 1).into_segmented(), 0f64..max)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(n as usize)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names
                    .get(*i as usize)
                    .map(|p| short_pod(p).to_owned())
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc("orders")
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(run.per_pod.iter().enumerate().map(|(i, (_, count))| {
                let i = i as u32;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *count as f64),
                    ],
                    RGBColor(70, 130, 180).filled(),
                );
                bar.set_margin(0, 0, 20, 20);
                bar
            }))
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// A pod's name without its ReplicaSet prefix (`inventory-5d8f7c9b4-x2kqp` → `x2kqp`).
pub fn short_pod(name: &str) -> &str {
    name.rsplit('-').next().unwrap_or(name)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The whole page.
pub fn render_html(run: &DemoRun) -> anyhow::Result<String> {
    let timeline = timeline_svg(run)?;
    let pods = pods_svg(run)?;
    let restart = match run.restart {
        Some((from, Some(to))) => format!("{:.1} s, from {from:.1} s to {to:.1} s", to - from),
        Some((from, None)) => format!("began at {from:.1} s, did not finish"),
        None => "none".into(),
    };
    let pod_rows: String = run
        .per_pod
        .iter()
        .map(|(p, n)| format!("<tr><td>{}</td><td>{n}</td></tr>", escape(p)))
        .collect();
    Ok(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sluice demo run</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse}}td,th{{padding:2px 12px;border-bottom:1px solid #ddd;text-align:left}}</style>
</head><body>
<h1>Sluice demo: order &rarr; inventory</h1>
<table id="summary">
<tr><th>orders published</th><td>{orders}</td></tr>
<tr><th>delivered</th><td>{delivered}</td></tr>
<tr><th>duplicates</th><td>{duplicates}</td></tr>
<tr><th>lost</th><td>{lost}</td></tr>
<tr><th>elapsed</th><td>{elapsed:.1} s</td></tr>
<tr><th>rolling restart</th><td>{restart}</td></tr>
</table>
<div id="timeline">{timeline}</div>
<div id="pods">{pods}</div>
<table id="per-pod"><tr><th>pod</th><th>orders</th></tr>{pod_rows}</table>
</body></html>
"#,
        orders = run.orders,
        delivered = run.delivered,
        duplicates = run.duplicates,
        lost = run.lost,
        elapsed = run.elapsed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> DemoRun {
        let samples = (0..=20)
            .map(|i| Sample {
                t: f64::from(i),
                produced: 400 * i as u64,
                delivered: 380 * i as u64,
                lag: Some(if i == 10 { 900 } else { 20 }),
            })
            .collect();
        DemoRun {
            samples,
            restart: Some((9.5, Some(14.0))),
            per_pod: vec![
                ("inventory-5d8f7c9b4-x2kqp".into(), 4000),
                ("inventory-5d8f7c9b4-<b&>".into(), 3600),
            ],
            orders: 8000,
            delivered: 7600,
            duplicates: 0,
            lost: 0,
            elapsed: 20.0,
        }
    }

    #[test]
    fn rates_are_deltas_over_time_and_skip_zero_intervals() {
        let s = |t, delivered| Sample {
            t,
            produced: 0,
            delivered,
            lag: None,
        };
        assert_eq!(
            rates(&[s(0.0, 0), s(2.0, 100), s(2.0, 150), s(3.0, 150)]),
            vec![(2.0, 50.0), (3.0, 0.0)]
        );
        assert!(rates(&[]).is_empty());
        assert!(rates(&[s(1.0, 5)]).is_empty());
    }

    #[test]
    fn the_page_holds_both_charts_the_restart_band_and_the_summary() {
        let html = render_html(&run()).unwrap();
        assert_eq!(html.matches("<svg").count(), 2, "two inline charts");
        assert!(!html.contains("<script"), "no scripts");
        assert!(!html.contains("src="), "nothing external");
        assert!(html.contains("rolling restart"));
        assert!(html.contains("4.5 s, from 9.5 s to 14.0 s"));
        assert!(html.contains("<tr><th>duplicates</th><td>0</td></tr>"));
        // 20 rate points and 21 lag points are drawn as two polylines.
        let polylines: Vec<&str> = html.split("<polyline").skip(1).collect();
        let points = |p: &str| {
            p.split("points=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .split_whitespace()
                .count()
        };
        let mut counts: Vec<usize> = polylines
            .iter()
            .map(|p| points(p))
            .filter(|n| *n > 2)
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![20, 21], "{counts:?}");
    }

    #[test]
    fn pod_names_are_escaped_and_shortened_on_the_axis() {
        let html = render_html(&run()).unwrap();
        assert!(html.contains("inventory-5d8f7c9b4-&lt;b&amp;&gt;"));
        assert!(!html.contains("<b&>"));
        assert!(
            html.contains("\nx2kqp\n</text>"),
            "the axis label is the pod's suffix"
        );
        assert_eq!(short_pod("inventory-5d8f7c9b4-x2kqp"), "x2kqp");
        assert_eq!(short_pod("plain"), "plain");
    }

    #[test]
    fn a_run_without_samples_or_pods_still_renders() {
        let html = render_html(&DemoRun::default()).unwrap();
        assert_eq!(html.matches("<svg").count(), 2);
        assert!(html.contains("<td>none</td>"));
    }
}
