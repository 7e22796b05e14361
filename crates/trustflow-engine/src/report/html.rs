//! The report as one HTML page. Everything it shows passes through [`esc`]; charts are
//! inline SVG drawn here; the one script (sortable tables) is allowed by its hash in
//! the page's Content-Security-Policy, so no other script can run even if a caption
//! slipped through unescaped, and the page loads nothing from anywhere.

use std::fmt::Write;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::{Card, EpochLine, Histogram, Report, RunFile, Trust};
use crate::run::RunReport;

/// `s` as HTML text or attribute value.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// 1234567 as "1,234,567".
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

const STYLE: &str = r#"
:root { --ok: #1a7f37; --bad: #c62828; --ink: #1f2328; --muted: #656d76; --line: #d0d7de;
  --busy: #2f6fdf; --blocked: #e09b16; --starved: #b9c3cf; --right: #1a7f37; --wrong: #c62828; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; }
header { border-bottom: 1px solid var(--line); margin-bottom: 8px; }
h1 { font-size: 24px; margin: 20px 0 4px; } h2 { font-size: 19px; margin: 28px 0 8px;
  border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
nav a { margin-right: 14px; } .muted { color: var(--muted); }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { cursor: pointer; user-select: none; }
#invariant { font-size: 16px; font-weight: 600; padding: 8px 12px; border-radius: 6px; }
.ok { color: var(--ok); background: #e9f6ec; } .bad { color: var(--bad); background: #fdecec; }
.bar { display: flex; width: 220px; height: 12px; border-radius: 3px; overflow: hidden; background: #eee; }
.bar span { display: block; height: 100%; }
.busy { background: var(--busy); } .blocked { background: var(--blocked); } .starved { background: var(--starved); }
.key span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
.card { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; overflow: hidden; }
.card img { display: block; margin: 0 auto 6px; width: 112px; height: auto; image-rendering: pixelated; }
.noimg { height: 60px; display: flex; align-items: center; justify-content: center; text-align: center;
  font-size: 12px; color: var(--muted); background: #f6f8fa; margin-bottom: 6px; padding: 4px; }
.caption { margin: 0 0 4px; word-break: break-word; white-space: pre-wrap; }
.caption.raw { font-size: 12px; color: var(--muted); }
.meta { font-size: 12px; color: var(--muted); word-break: break-all; }
.tag { display: inline-block; font-size: 11px; padding: 0 5px; border-radius: 8px; background: #eef1f5; margin-right: 4px; }
.right { color: var(--right); } .wrong { color: var(--wrong); }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
.figure { font-size: 22px; font-weight: 600; }
"#;

/// Click a header to sort its table; numbers sort as numbers.
const SCRIPT: &str = r#"
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var down = th.dataset.dir !== "down"; th.dataset.dir = down ? "down" : "up";
    var key = function (r) { var t = r.cells[th.cellIndex].dataset.v || r.cells[th.cellIndex].textContent;
      var n = parseFloat(t.replace(/,/g, "")); return isNaN(n) ? t : n; };
    rows.sort(function (a, b) { var x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (down ? -1 : 1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"#;

pub(crate) fn render(report: &Report) -> String {
    let script_hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(SCRIPT));
    let mut s = String::with_capacity(64 * 1024);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <link rel=\"icon\" href=\"data:,\">\n<title>trustflow report: {}</title>\n\
         <style>{STYLE}</style></head><body>\n",
        esc(&report.title)
    );
    header(&mut s, report);
    run_section(&mut s, report);
    quarantine_section(&mut s, report);
    trust_section(&mut s, report);
    gallery_section(&mut s, report);
    training_section(&mut s, report);
    footer(&mut s, report);
    let _ = write!(s, "<script>{SCRIPT}</script>\n</body></html>\n");
    s
}

fn header(s: &mut String, r: &Report) {
    let b = &r.budget;
    let _ = write!(
        s,
        "<header><h1>{}</h1><p class=\"muted\">Output folder <code>{}</code> · trustflow {} · \
         {} of {} output rows read{}</p>\n<nav><a href=\"#run\">Run</a><a href=\"#quarantine\">\
         Quarantine</a><a href=\"#trust\">Trust</a><a href=\"#galleries\">Galleries</a>\
         <a href=\"#training\">Training</a></nav></header>\n",
        esc(&r.title),
        esc(&r.out_dir.display().to_string()),
        esc(&r.trustflow_version),
        count(b.output_rows_read),
        count(b.output_rows_total),
        if b.complete() {
            " (all: figures are exact)"
        } else {
            " (a sample spread over the folder; counts are exact)"
        },
    );
}

fn run_section(s: &mut String, r: &Report) {
    let t = &r.totals;
    s.push_str("<section id=\"run\"><h2>Run</h2>\n");
    let (class, mark, says) = match (t.shards, t.invariant_holds) {
        (0, _) => ("bad", "✘", "No finished shard in this folder.".to_string()),
        (n, true) => (
            "ok",
            "✔",
            format!(
                "Every row is accounted for: rows in {} = out {} + quarantined {}, in each of \
                 the {n} finished shard{}.",
                count(t.rows_in),
                count(t.rows_out),
                count(t.rows_quarantined),
                if n == 1 { "" } else { "s" }
            ),
        ),
        (n, false) => (
            "bad",
            "✘",
            format!(
                "Row accounting is broken in {} of {n} shards: rows in {} ≠ out {} + \
                 quarantined {}.",
                t.shards_breaking_invariant,
                count(t.rows_in),
                count(t.rows_out),
                count(t.rows_quarantined)
            ),
        ),
    };
    let _ = writeln!(
        s,
        "<p id=\"invariant\" class=\"{class}\">{mark} {}</p>",
        esc(&says)
    );
    for run in &r.runs {
        run_file(s, run);
    }
    if !r.unfinished.is_empty() {
        let _ = writeln!(
            s,
            "<p class=\"bad\">Data files without a manifest (an interrupted or foreign run; a \
             rerun replaces them): {}</p>",
            esc(&r.unfinished.join(", "))
        );
    }
    for c in &r.corrupt_manifests {
        let _ = writeln!(
            s,
            "<p class=\"bad\">Corrupt manifest {} (its shard is not finished; a rerun redoes \
             it): {}</p>",
            esc(&c.manifest),
            esc(&c.error)
        );
    }
    s.push_str(
        "<h3>Shards</h3><table class=\"sortable\" id=\"shards\"><thead><tr><th>shard</th>\
         <th>input</th><th class=\"n\">rows in</th><th class=\"n\">out</th>\
         <th class=\"n\">quarantined</th><th>invariant</th></tr></thead><tbody>\n",
    );
    for sh in &r.shards {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td class=\"meta\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}\
             </td><td class=\"n\">{}</td><td class=\"{}\">{}</td></tr>",
            esc(&sh.stem),
            esc(&sh.input.display().to_string()),
            count(sh.rows_in),
            count(sh.rows_out),
            count(sh.rows_quarantined),
            if sh.invariant_holds { "ok" } else { "bad" },
            if sh.invariant_holds {
                "holds"
            } else {
                "BROKEN"
            }
        );
    }
    s.push_str("</tbody></table>\n");
    if r.shards_not_listed > 0 {
        let _ = writeln!(
            s,
            "<p class=\"muted\">{} more shards are counted above but not listed.</p>",
            count(r.shards_not_listed as u64)
        );
    }
    s.push_str("</section>\n");
}

fn run_file(s: &mut String, run: &RunFile) {
    let _ = writeln!(s, "<h3>{}</h3>", esc(&run.file));
    let Some(rep) = &run.report else {
        let _ = writeln!(
            s,
            "<p class=\"bad\">Could not read this run report: {}</p>",
            esc(run.error.as_deref().unwrap_or("unknown error"))
        );
        return;
    };
    run_table(s, rep);
    steps_table(s, rep);
}

fn run_table(s: &mut String, rep: &RunReport) {
    let mut rows: Vec<(&str, String)> = vec![
        ("pipeline", rep.pipeline.clone()),
        ("pipeline file", rep.pipeline_file.display().to_string()),
        ("pipeline hash", rep.pipeline_hash.clone()),
        (
            "shards",
            format!(
                "{} processed, {} skipped (finished before)",
                rep.shards_processed, rep.shards_skipped
            ),
        ),
        (
            "rows",
            format!(
                "{} in, {} out, {} quarantined",
                count(rep.rows_in),
                count(rep.rows_out),
                count(rep.rows_quarantined)
            ),
        ),
        (
            "wall time",
            format!("{:.1} s ({:.0} rows/s)", rep.wall_s, rep.rows_per_s),
        ),
    ];
    if let Some(cpu) = rep.cpu_utilisation {
        rows.push(("CPU", format!("{cpu:.2} cores busy on average")));
    }
    if let Some(rss) = rep.peak_rss_bytes {
        rows.push(("peak memory", format!("{:.0} MiB", rss as f64 / 1048576.0)));
    }
    rows.push((
        "bottleneck",
        rep.bottleneck
            .clone()
            .unwrap_or_else(|| "none found".into()),
    ));
    for u in &rep.unreadable {
        let part = u
            .row_group
            .map_or_else(String::new, |g| format!(", row group {g}"));
        rows.push((
            "unreadable (skipped)",
            format!("{}{part}: {}", u.input.display(), u.reason),
        ));
    }
    s.push_str("<table class=\"kv\"><tbody>\n");
    for (k, v) in rows {
        let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    }
    s.push_str("</tbody></table>\n");
}

fn steps_table(s: &mut String, rep: &RunReport) {
    s.push_str(
        "<table class=\"sortable steps\"><thead><tr><th>step</th><th class=\"n\">workers</th>\
         <th class=\"n\">rows in</th><th class=\"n\">rows/s</th><th class=\"n\">quarantined</th>\
         <th>time: <span class=\"key\"><span class=\"busy\"></span>busy<span class=\"blocked\">\
         </span>blocked (output full)<span class=\"starved\"></span>starved (input empty)</span>\
         </th></tr></thead><tbody>\n",
    );
    for step in &rep.steps {
        let mark = if rep.bottleneck.as_deref() == Some(step.name.as_str()) {
            " <span class=\"tag\">bottleneck</span>"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<tr><td>{}{mark}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{:.0}</td><td class=\"n\">{}</td><td data-v=\"{:.4}\">\
             <div class=\"bar\" title=\"busy {} · blocked {} · starved {}\">\
             <span class=\"busy\" style=\"width:{:.1}%\"></span>\
             <span class=\"blocked\" style=\"width:{:.1}%\"></span>\
             <span class=\"starved\" style=\"width:{:.1}%\"></span></div></td></tr>",
            esc(&step.name),
            step.workers,
            count(step.rows_in),
            step.rows_per_s,
            count(step.rows_quarantined),
            step.busy_fraction,
            pct(step.busy_fraction),
            pct(step.blocked_fraction),
            pct(step.starved_fraction),
            100.0 * step.busy_fraction.clamp(0.0, 1.0),
            100.0 * step.blocked_fraction.clamp(0.0, 1.0),
            100.0 * step.starved_fraction.clamp(0.0, 1.0),
        );
    }
    s.push_str("</tbody></table>\n");
}

fn quarantine_section(s: &mut String, r: &Report) {
    s.push_str("<section id=\"quarantine\"><h2>Quarantine</h2>\n");
    if r.quarantine.is_empty() {
        s.push_str("<p id=\"no-quarantine\">No row was quarantined.</p></section>\n");
        return;
    }
    let total: u64 = r.quarantine.iter().map(|q| q.rows).sum();
    s.push_str(
        "<table class=\"sortable\" id=\"reasons\"><thead><tr><th>stage: reason</th>\
         <th class=\"n\">rows</th><th class=\"n\">share</th></tr></thead><tbody>\n",
    );
    for q in &r.quarantine {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&q.reason),
            count(q.rows),
            pct(q.rows as f64 / total.max(1) as f64)
        );
    }
    s.push_str("</tbody></table>\n");
    for q in r.quarantine.iter().filter(|q| !q.samples.is_empty()) {
        let _ = writeln!(
            s,
            "<h3>{} <span class=\"muted\">({} rows; {} shown)</span></h3>",
            esc(&q.reason),
            count(q.rows),
            q.samples.len()
        );
        cards(s, &q.samples, "quarantine-samples");
    }
    s.push_str("</section>\n");
}

fn trust_section(s: &mut String, r: &Report) {
    s.push_str("<section id=\"trust\"><h2>Trust</h2>\n");
    let Some(t) = &r.trust else {
        s.push_str(
            "<p>The outputs have no <code>pseudo_weight</code> column: this pipeline ran no \
             uncertainty stage.</p></section>\n",
        );
        return;
    };
    trust_body(s, t);
    s.push_str("</section>\n");
}

fn trust_body(s: &mut String, t: &Trust) {
    let _ = writeln!(
        s,
        "<p>Weights of {} rows: mean {}. A low weight means the caption's pseudo-label is \
         distrusted (it counts less in training).</p>",
        count(t.rows),
        opt(t.weight.mean, 3)
    );
    s.push_str("<div class=\"charts\">");
    histogram_svg(
        s,
        "pseudo_weight",
        &[("all rows", "#2f6fdf", &t.weight)],
        "weight-histogram",
    );
    if let Some(sim) = &t.similarity {
        histogram_svg(
            s,
            "clip_similarity",
            &[("all rows", "#8250df", sim)],
            "similarity-histogram",
        );
    }
    if let Some(l) = &t.labelled {
        histogram_svg(
            s,
            "weight: right vs wrong",
            &[
                ("right", "#1a7f37", &l.weight_right),
                ("wrong", "#c62828", &l.weight_wrong),
            ],
            "right-wrong-histogram",
        );
    }
    s.push_str("</div>\n");
    if let Some(l) = &t.labelled {
        let _ = writeln!(
            s,
            "<p id=\"labelled\">Against the <code>label</code> column ({} rows): pseudo-labels \
             <span class=\"right\">right {}</span>, <span class=\"wrong\">wrong {}</span> \
             (accuracy {}). Mean weight right {} vs wrong {}. AUROC of the weight for \
             right vs wrong: <span class=\"figure\" id=\"auroc\">{}</span> (0.5 = no better \
             than chance).</p>",
            count(l.rows),
            count(l.right),
            count(l.wrong),
            l.accuracy.map_or("–".into(), pct),
            opt(l.weight_right.mean, 3),
            opt(l.weight_wrong.mean, 3),
            opt(l.auroc, 3)
        );
    }
    if t.classes.is_empty() {
        return;
    }
    s.push_str(
        "<h3>Per pseudo-label class</h3><table class=\"sortable\" id=\"classes\"><thead><tr>\
         <th class=\"n\">class</th><th>name</th><th class=\"n\">rows</th>\
         <th class=\"n\">mean weight</th><th class=\"n\">pseudo-label accuracy</th>\
         <th>weights (0 → 1)</th></tr></thead><tbody>\n",
    );
    for c in &t.classes {
        let _ = write!(
            s,
            "<tr><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td>",
            c.class,
            esc(c.name.as_deref().unwrap_or("")),
            count(c.rows),
            opt(c.weight.mean, 3),
            c.accuracy.map_or("–".into(), pct)
        );
        sparkline_svg(s, &c.weight);
        s.push_str("</td></tr>\n");
    }
    s.push_str("</tbody></table>\n");
    if t.classes_not_listed > 0 {
        let _ = writeln!(
            s,
            "<p class=\"muted\">{} less frequent classes are not listed.</p>",
            t.classes_not_listed
        );
    }
}

fn gallery_section(s: &mut String, r: &Report) {
    let g = &r.galleries;
    s.push_str("<section id=\"galleries\"><h2>Galleries</h2>\n");
    let exact = if r.budget.complete() {
        "over every output row"
    } else {
        "over the rows read"
    };
    let groups: [(&str, &str, &[Card]); 4] = [
        (
            "lowest-weight",
            "Lowest weight: the captions trusted least",
            &g.lowest_weight,
        ),
        (
            "highest-weight",
            "Highest weight: the captions trusted most",
            &g.highest_weight,
        ),
        (
            "generated",
            "Generated captions (the captioner wrote them)",
            &g.generated_captions,
        ),
        ("sample", "Rows as read", &g.sample),
    ];
    let mut any = false;
    for (id, title, list) in groups {
        if list.is_empty() {
            continue;
        }
        any = true;
        let _ = writeln!(
            s,
            "<h3>{} <span class=\"muted\">({exact})</span></h3>",
            esc(title)
        );
        cards(s, list, id);
    }
    if !any {
        s.push_str("<p>No output row to show.</p>");
    }
    s.push_str("</section>\n");
}

fn cards(s: &mut String, list: &[Card], id: &str) {
    let _ = writeln!(s, "<div class=\"cards gallery\" id=\"{}\">", esc(id));
    for c in list {
        card(s, c);
    }
    s.push_str("</div>\n");
}

fn card(s: &mut String, c: &Card) {
    s.push_str("<figure class=\"card\">");
    let alt = c.id.as_deref().unwrap_or("row");
    match (&c.thumbnail, &c.no_thumbnail) {
        (Some(t), _) => {
            let _ = write!(
                s,
                "<img src=\"{}\" width=\"{}\" height=\"{}\" alt=\"{}\" title=\"{}×{} px\">",
                esc(&t.data_uri),
                t.width,
                t.height,
                esc(alt),
                t.source_width,
                t.source_height
            );
        }
        (None, why) => {
            let _ = write!(
                s,
                "<div class=\"noimg\">no preview: {}</div>",
                esc(why.as_deref().unwrap_or("not read"))
            );
        }
    }
    s.push_str("<figcaption>");
    match &c.caption {
        Some(text) => {
            let _ = write!(s, "<p class=\"caption\">{}</p>", esc(text));
        }
        None => s.push_str("<p class=\"caption muted\">(no caption)</p>"),
    }
    if let Some(raw) = &c.caption_raw {
        let _ = write!(s, "<p class=\"caption raw\">as it came: {}</p>", esc(raw));
    }
    s.push_str("<div class=\"meta\">");
    if c.caption_generated {
        s.push_str("<span class=\"tag\">generated</span>");
    }
    if c.caption_not_utf8 {
        s.push_str("<span class=\"tag\">not UTF-8 (shown lossily)</span>");
    }
    if let Some(reason) = &c.reason {
        let _ = write!(s, "<div class=\"wrong\">{}</div>", esc(reason));
    }
    if let Some(w) = c.weight {
        let _ = write!(s, "<div>weight <b>{w:.3}</b></div>");
    }
    if let Some(k) = c.pseudo_label {
        let name = c
            .pseudo_label_name
            .as_deref()
            .map(|n| format!(" ({})", esc(n)))
            .unwrap_or_default();
        let _ = write!(
            s,
            "<div>pseudo-label {k}{name}{}</div>",
            c.pseudo_prob
                .map_or(String::new(), |p| format!(", p {p:.2}"))
        );
    }
    if let Some(label) = c.label {
        let mark = match c.pseudo_label {
            Some(k) if k == label => " <span class=\"right\">✔ right</span>",
            Some(_) => " <span class=\"wrong\">✘ wrong</span>",
            None => "",
        };
        let _ = write!(s, "<div>label {label}{mark}</div>");
    }
    if let Some(sim) = c.similarity {
        let _ = write!(s, "<div>similarity {sim:.3}</div>");
    }
    let _ = write!(
        s,
        "<div>id {}</div>",
        esc(c.id.as_deref().unwrap_or("(none)"))
    );
    s.push_str("</div></figcaption></figure>\n");
}

fn training_section(s: &mut String, r: &Report) {
    s.push_str("<section id=\"training\"><h2>Training</h2>\n");
    if r.training.is_empty() {
        s.push_str(
            "<p>No training run found (a folder with <code>metrics.jsonl</code> in the output \
             folder or under <code>--runs</code>).</p></section>\n",
        );
        return;
    }
    for run in &r.training {
        let _ = writeln!(
            s,
            "<h3>{} <span class=\"muted\">({})</span></h3>",
            esc(&run.name),
            esc(&run.metrics.display().to_string())
        );
        if run.epochs.is_empty() {
            s.push_str("<p class=\"muted\">No finished epoch yet.</p>");
            continue;
        }
        let mut terms: Vec<&String> = run.epochs.iter().flat_map(|e| e.loss.keys()).collect();
        terms.sort();
        terms.dedup();
        s.push_str("<div class=\"charts\">");
        loss_svg(s, &run.epochs, &terms);
        s.push_str(
            "</div><table class=\"sortable training\"><thead><tr><th class=\"n\">epoch</th>",
        );
        for t in &terms {
            let _ = write!(s, "<th class=\"n\">loss {}</th>", esc(t));
        }
        s.push_str(
            "<th class=\"n\">target accuracy</th><th class=\"n\">pseudo-label accuracy</th>\
             <th class=\"n\">weight AUROC</th></tr></thead><tbody>\n",
        );
        for e in &run.epochs {
            let _ = write!(s, "<tr><td class=\"n\">{}</td>", e.epoch);
            for t in &terms {
                let _ = write!(
                    s,
                    "<td class=\"n\">{}</td>",
                    opt(e.loss.get(*t).copied(), 4)
                );
            }
            let _ = writeln!(
                s,
                "<td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                e.target_accuracy.map_or("–".into(), pct),
                e.pseudo_label_accuracy.map_or("–".into(), pct),
                opt(e.weight_auroc, 3)
            );
        }
        s.push_str("</tbody></table>\n");
    }
    s.push_str("</section>\n");
}

fn footer(s: &mut String, r: &Report) {
    let b = &r.budget;
    let _ = writeln!(
        s,
        "<footer class=\"muted\"><h2>How this page was read</h2><p>Counts, reasons and the \
         invariant come from the shards' manifests (exact). Figures and galleries come from \
         {} of {} output rows ({} of {} row groups, whole row groups spread over the folder; \
         at most {} rows). Quarantine samples: {} quarantine rows read. {} thumbnails made by \
         the engine's decoder under its limits ({} images could not be shown). Built in \
         {:.1} s.</p></footer>",
        count(b.output_rows_read),
        count(b.output_rows_total),
        count(b.row_groups_read as u64),
        count(b.row_groups_total as u64),
        count(b.max_rows),
        count(b.quarantine_rows_read),
        b.thumbnails,
        b.thumbnails_failed,
        b.seconds
    );
}

const CHART_W: f64 = 360.0;
const CHART_H: f64 = 150.0;
const PAD_L: f64 = 40.0;
const PAD_B: f64 = 22.0;
const PAD_T: f64 = 18.0;

/// Overlaid histograms sharing their bins.
fn histogram_svg(s: &mut String, title: &str, series: &[(&str, &str, &Histogram)], id: &str) {
    let Some(first) = series.first().map(|x| x.2) else {
        return;
    };
    let max = series
        .iter()
        .flat_map(|x| x.2.counts.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_w = CHART_W - PAD_L - 8.0;
    let plot_h = CHART_H - PAD_B - PAD_T;
    let bins = first.counts.len().max(1);
    let bar_w = plot_w / bins as f64;
    let _ = write!(
        s,
        "<svg id=\"{}\" role=\"img\" width=\"{CHART_W}\" height=\"{CHART_H}\" \
         viewBox=\"0 0 {CHART_W} {CHART_H}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title>{}</title><text x=\"{PAD_L}\" y=\"12\">{}</text>",
        esc(id),
        esc(title),
        esc(title)
    );
    let opacity = if series.len() > 1 { 0.55 } else { 0.9 };
    for (name, colour, h) in series {
        for (i, &n) in h.counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let height = plot_h * n as f64 / max as f64;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\" \
                 fill-opacity=\"{opacity}\"><title>{}: {}</title></rect>",
                PAD_L + i as f64 * bar_w + 0.5,
                PAD_T + plot_h - height,
                (bar_w - 1.0).max(0.5),
                height,
                esc(name),
                count(n)
            );
        }
    }
    let axis_y = PAD_T + plot_h;
    let _ = write!(
        s,
        "<line x1=\"{PAD_L}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"#888\"/>\
         <text x=\"{PAD_L}\" y=\"{}\">{:.2}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.2}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        PAD_L + plot_w,
        axis_y + 14.0,
        first.lo,
        PAD_L + plot_w,
        axis_y + 14.0,
        first.hi,
        PAD_L - 4.0,
        PAD_T + 8.0,
        count(max)
    );
    if series.len() > 1 {
        let mut x = CHART_W - 84.0 * series.len() as f64;
        for (name, colour, h) in series {
            let _ = write!(
                s,
                "<rect x=\"{x:.0}\" y=\"4\" width=\"9\" height=\"9\" fill=\"{colour}\"/>\
                 <text x=\"{:.0}\" y=\"12\">{} ({})</text>",
                x + 12.0,
                esc(name),
                count(h.rows)
            );
            x += 84.0;
        }
    }
    s.push_str("</svg>");
}

/// A small histogram for a table cell.
fn sparkline_svg(s: &mut String, h: &Histogram) {
    let (w, ht) = (120.0, 22.0);
    let max = h.counts.iter().copied().max().unwrap_or(0).max(1);
    let bar = w / h.counts.len().max(1) as f64;
    let _ = write!(
        s,
        "<svg width=\"{w}\" height=\"{ht}\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    for (i, &n) in h.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
        let height = ht * n as f64 / max as f64;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"#2f6fdf\"/>",
            i as f64 * bar,
            ht - height,
            (bar - 0.5).max(0.5)
        );
    }
    s.push_str("</svg>");
}

/// Loss terms per epoch as lines.
fn loss_svg(s: &mut String, epochs: &[EpochLine], terms: &[&String]) {
    const COLOURS: [&str; 6] = [
        "#1f2328", "#2f6fdf", "#e09b16", "#1a7f37", "#c62828", "#8250df",
    ];
    let values = epochs.iter().flat_map(|e| e.loss.values().copied());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return;
    }
    let (lo, hi) = if hi > lo {
        (lo.min(0.0), hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    let first = epochs.first().map_or(0, |e| e.epoch) as f64;
    let last = epochs.last().map_or(1, |e| e.epoch) as f64;
    let span = (last - first).max(1.0);
    let plot_w = CHART_W - PAD_L - 8.0;
    let plot_h = CHART_H - PAD_B - PAD_T;
    let x = |epoch: u64| PAD_L + plot_w * (epoch as f64 - first) / span;
    let y = |v: f64| PAD_T + plot_h * (1.0 - (v - lo) / (hi - lo));
    let _ = write!(
        s,
        "<svg class=\"loss\" role=\"img\" width=\"{CHART_W}\" height=\"{CHART_H}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title>loss per epoch</title>\
         <text x=\"{PAD_L}\" y=\"12\">loss per epoch</text>"
    );
    for (i, term) in terms.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = epochs
            .iter()
            .filter_map(|e| Some(format!("{:.1},{:.1}", x(e.epoch), y(*e.loss.get(*term)?))))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\
             <text x=\"{:.0}\" y=\"{}\" style=\"fill:{colour}\">{}</text>",
            points.join(" "),
            PAD_L + 4.0 + 58.0 * i as f64,
            CHART_H - 4.0,
            esc(term)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{hi:.2}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{lo:.2}</text></svg>",
        PAD_L - 4.0,
        PAD_T + 8.0,
        PAD_L - 4.0,
        PAD_T + plot_h
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_becomes_text() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1234567), "1,234,567");
    }
}
