//! Machine-readable output: `key=value` summaries, appended to CSV files, and the plot of
//! throughput and p99 latency against the number of agents drawn from such a CSV.

use std::{collections::BTreeMap, io::Write, path::Path};

use anyhow::Context;
use plotters::prelude::*;

/// Parses a `key=value …` summary line.
pub fn parse_summary(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Appends a summary as a CSV row (writing the header first when the file is new). A file whose
/// header names other columns (another mode, another version of the benchmark) is refused, so
/// rows never land under the wrong names.
pub fn append_csv(path: &Path, summary: &str) -> anyhow::Result<()> {
    let fields = parse_summary(summary);
    let header = fields.keys().cloned().collect::<Vec<_>>().join(",");
    let new = !path.exists() || std::fs::metadata(path)?.len() == 0;
    if !new {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let theirs = text.lines().next().unwrap_or_default();
        anyhow::ensure!(
            theirs == header,
            "{} has other columns than this run writes (another mode, or an older kanade-bench): \
             write to a new file\n  the file's: {theirs}\n  this run's: {header}",
            path.display()
        );
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if new {
        writeln!(file, "{header}")?;
    }
    writeln!(
        file,
        "{}",
        fields.values().cloned().collect::<Vec<_>>().join(",")
    )?;
    Ok(())
}

/// Reads a CSV written by [`append_csv`].
pub fn read_csv(path: &Path) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty CSV")?.split(',').collect();
    Ok(lines
        .map(|l| {
            header
                .iter()
                .map(|h| h.to_string())
                .zip(l.split(',').map(str::to_string))
                .collect()
        })
        .collect())
}

/// A font plotters can draw text with: DejaVu Sans from the system.
fn font() -> anyhow::Result<&'static [u8]> {
    const CANDIDATES: [&str; 2] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    for path in CANDIDATES {
        if let Ok(bytes) = std::fs::read(path) {
            return Ok(Box::leak(bytes.into_boxed_slice()));
        }
    }
    anyhow::bail!("no DejaVu Sans font found (apt-get install fonts-dejavu-core)")
}

/// Draws events/s against agents (log scale) for both load shapes, with the separated shape's
/// PostgreSQL ceiling measured in the same runs, and p99 ack latency at a fixed offered rate,
/// from throughput rows.
pub fn plot(csv: &Path, png: &Path) -> anyhow::Result<()> {
    let rows = read_csv(csv)?;
    // Rows without a shape predate it: their runs were queued back to back.
    let shape_of = |r: &BTreeMap<String, String>| {
        r.get("shape")
            .cloned()
            .unwrap_or_else(|| "back-to-back".into())
    };
    let series = |shape: &str, offered_max: bool, value: &str| -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.get("mode").map(String::as_str) == Some("throughput"))
            .filter(|r| shape_of(r) == shape)
            .filter(|r| r.get("replicas").is_none_or(|n| n == "1"))
            .filter(|r| (r.get("rate").map(String::as_str) == Some("max")) == offered_max)
            .filter_map(|r| Some((r.get("agents")?.parse().ok()?, r.get(value)?.parse().ok()?)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    // Throughput at full load; latency at a fixed offered rate (at full load every event waits
    // behind all the others, so its latency only says how long the queue was).
    let separated = series("separated", true, "events_per_s");
    let back_to_back = series("back-to-back", true, "events_per_s");
    let ceiling = series("separated", true, "ceiling_separated");
    let mut latency = series("separated", false, "p99_ms");
    if latency.is_empty() {
        latency = series("back-to-back", false, "p99_ms");
    }
    anyhow::ensure!(
        !separated.is_empty() || !back_to_back.is_empty(),
        "no full-load throughput rows in {}",
        csv.display()
    );
    let rate = rows
        .iter()
        .find(|r| r.get("rate").is_some_and(|v| v != "max"))
        .and_then(|r| r.get("rate").cloned())
        .map_or("full load".to_string(), |r| format!("{r} events/s offered"));
    plotters::style::register_font("sans-serif", FontStyle::Normal, font()?)
        .map_err(|_| anyhow::anyhow!("registering the font"))?;

    let root = BitMapBackend::new(png, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let max_x = separated
        .iter()
        .chain(&back_to_back)
        .chain(&latency)
        .map(|p| p.0)
        .fold(1.0, f64::max)
        * 1.5;
    let max_tp = separated
        .iter()
        .chain(&back_to_back)
        .chain(&ceiling)
        .map(|p| p.1)
        .fold(0.0, f64::max)
        * 1.2;
    let max_p99 = latency.iter().map(|p| p.1).fold(0.0, f64::max) * 1.2;

    let mut chart = ChartBuilder::on(&left)
        .caption(
            "Events/s committed and acked (full load)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..max_x).log_scale(), 0f64..max_tp)?;
    chart
        .configure_mesh()
        .x_desc("agents")
        .y_desc("events/s")
        .draw()?;
    let grey = RGBColor(150, 150, 150);
    let green = RGBColor(0, 140, 60);
    for (points, color, label) in [
        (&ceiling, grey, "PostgreSQL ceiling (separated)"),
        (&separated, BLUE, "separated"),
        (&back_to_back, green, "back to back"),
    ] {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;

    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!("p99 ack latency at {rate} (separated)"),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..max_x).log_scale(), 0f64..max_p99.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("agents")
        .y_desc("ms")
        .draw()?;
    chart.draw_series(LineSeries::new(latency.iter().copied(), &RED))?;
    chart.draw_series(latency.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_appended_under_their_own_header_and_a_different_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("bench.csv");
        append_csv(&csv, "mode=throughput agents=1 events_per_s=10").unwrap();
        append_csv(&csv, "mode=throughput agents=10 events_per_s=90").unwrap();
        let rows = read_csv(&csv).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["agents"], "10");
        assert_eq!(rows[1]["events_per_s"], "90");

        let err = append_csv(
            &csv,
            "mode=throughput agents=100 events_per_s=700 ratio=0.5",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("has other columns"), "{err}");
        assert_eq!(read_csv(&csv).unwrap().len(), 2, "nothing appended");
    }
}
