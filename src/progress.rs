//! Live progress on a terminal: one line per step with rows/s, busy share and input
//! queue fill, and which step is the bottleneck. Hidden when stderr is not a terminal.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use trustflow_engine::runtime::RunSnapshot;

#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
    header: ProgressBar,
    lines: Vec<ProgressBar>,
}

impl Progress {
    /// `steps` are the step names in order (source, stages..., sink).
    pub fn new(steps: &[String], shards_total: u64) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let header = multi.add(ProgressBar::new(shards_total));
        header.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {pos}/{len} shards  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        header.set_prefix("trustflow");
        let style = ProgressStyle::with_template("  {prefix:<16} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let lines = steps
            .iter()
            .map(|name| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(name.clone());
                bar
            })
            .collect();
        Progress {
            multi,
            header,
            lines,
        }
    }

    pub fn update(&self, s: &RunSnapshot) {
        self.header.set_position(s.shards_done);
        self.header.set_message(format!(
            "{:.0}s  in flight {} rows / {:.1} MiB  bottleneck: {}",
            s.elapsed_s,
            s.rows_in_flight,
            s.bytes_in_flight as f64 / (1 << 20) as f64,
            s.bottleneck.as_deref().unwrap_or("-")
        ));
        for (bar, step) in self.lines.iter().zip(&s.steps) {
            let mark = if s.bottleneck.as_deref() == Some(step.name.as_str()) {
                " <- bottleneck"
            } else {
                ""
            };
            bar.set_message(format!(
                "{:>9} rows {:>8.0} rows/s  busy {:>3.0}%  blocked {:>3.0}%  starved {:>3.0}%  queue {:>3.0}%  quarantined {}{mark}",
                step.rows_out,
                step.rows_per_s,
                step.busy_fraction * 100.0,
                step.blocked_fraction * 100.0,
                step.starved_fraction * 100.0,
                step.queue_fill_mean * 100.0,
                step.rows_quarantined,
            ));
        }
    }

    pub fn finish(&self) {
        self.header.finish();
        for bar in &self.lines {
            bar.finish();
        }
        let _ = self.multi.clear();
    }
}

/// One plain line of progress, for logs and other non-terminals.
pub fn progress_line(s: &RunSnapshot) -> String {
    let rows = s.steps.last().map_or(0, |x| x.rows_in);
    format!(
        "progress: {:.0}s, {}/{} shards, {rows} rows done, bottleneck {}",
        s.elapsed_s,
        s.shards_done,
        s.shards_total,
        s.bottleneck.as_deref().unwrap_or("-")
    )
}
