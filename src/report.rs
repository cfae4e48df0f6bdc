//! `report.html`: one self-contained page per run directory (images embedded as data URIs,
//! charts drawn by plotters), readable offline.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::io::plot::Chart;
use crate::metrics::persistence::{PersistenceCurve, PersistencePoint};
use crate::{Error, Result};

/// The section ids of every report, in page order.
pub const SECTIONS: [&str; 8] = [
    "metrics",
    "samples",
    "triggered",
    "curves",
    "verification",
    "detection",
    "specificity",
    "persistence",
];

/// The report's file name inside the run directory.
pub const REPORT: &str = "report.html";

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:{mime};base64,{b64}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An `<img>` of a one-line chart.
fn line_img(chart: &Chart, points: Vec<(f64, f64)>) -> Result<String> {
    let svg = chart.svg(&points)?;
    Ok(format!(
        "<img class=\"chart\" alt=\"{}\" src=\"{}\">",
        escape(chart.title),
        data_uri("image/svg+xml", svg.as_bytes())
    ))
}

/// Reads an optional JSON file of the run.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(path, format!("is not valid JSON: {e}")))
}

/// Rows `key → value` of a JSON object, nested objects with dotted keys and long arrays
/// summarised by their length.
pub fn flatten(prefix: &str, v: &serde_json::Value, rows: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, rows);
            }
        }
        serde_json::Value::Array(a) if a.len() > 10 => {
            rows.push((prefix.into(), format!("[{} values]", a.len())))
        }
        // A list of records (a key's triggers): a row per field of each, numbered from 1.
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_object()) && !a.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{}", i + 1), x, rows);
            }
        }
        serde_json::Value::Number(n) => {
            let text = match n.as_f64() {
                Some(f) if n.is_f64() && f != 0.0 && f.abs() < 1e-3 => format!("{f:.4e}"),
                Some(f) if n.is_f64() => format!("{f:.6}"),
                _ => n.to_string(),
            };
            rows.push((prefix.into(), text))
        }
        other => rows.push((prefix.into(), other.to_string())),
    }
}

fn table(v: &serde_json::Value) -> String {
    let mut rows = Vec::new();
    flatten("", v, &mut rows);
    let mut s = String::from("<table>");
    for (k, x) in rows {
        let _ = write!(s, "<tr><th>{}</th><td>{}</td></tr>", escape(&k), escape(&x));
    }
    s + "</table>"
}

/// Charts of `train.csv`: one per column, log scale for `tardis` and `backdoor_loss`.
fn training_charts(csv: &Path) -> Result<String> {
    let text = std::fs::read_to_string(csv).map_err(|e| Error::io(csv, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let rows: Vec<Vec<f64>> = lines
        .map(|l| {
            l.split(',')
                .map(|x| x.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    let mut html = String::new();
    for (c, name) in header.iter().enumerate().skip(1) {
        let points = rows
            .iter()
            .filter(|r| r.len() == header.len())
            .map(|r| (r[0], r[c]))
            .collect();
        let chart = Chart {
            title: name,
            x_label: "step",
            y_label: name,
            log_y: matches!(*name, "tardis" | "backdoor_loss"),
        };
        html += &line_img(&chart, points)?;
    }
    Ok(html)
}

/// The `<img>` of a PNG in the run, or a note that it is missing.
fn png(run: &Path, name: &str, alt: &str) -> Result<String> {
    let path = run.join(name);
    if !path.exists() {
        return Ok(format!(
            "<p class=\"missing\">{name} is not in this run.</p>"
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    Ok(format!(
        "<img class=\"grid\" alt=\"{}\" src=\"{}\">",
        escape(alt),
        data_uri("image/png", &bytes)
    ))
}

fn specificity_section(metrics: &serde_json::Value) -> Result<String> {
    let s = &metrics["specificity"];
    let (Some(d), Some(f), Some(m)) = (
        s["distance"].as_array(),
        s["fire_rate"].as_array(),
        s["target_mse"].as_array(),
    ) else {
        return Ok("<p class=\"missing\">No key: specificity was not measured.</p>".into());
    };
    let pts = |v: &Vec<serde_json::Value>| -> Vec<(f64, f64)> {
        d.iter()
            .zip(v)
            .filter_map(|(a, b)| Some((a.as_f64()?, b.as_f64()?)))
            .collect()
    };
    let x_label = "input-space distance from the trigger";
    let fire = line_img(
        &Chart {
            title: "firing rate away from the trigger",
            x_label,
            y_label: "fire rate",
            log_y: false,
        },
        pts(f),
    )?;
    let mse = line_img(
        &Chart {
            title: "target distance away from the trigger",
            x_label,
            y_label: "median target_mse",
            log_y: true,
        },
        pts(m),
    )?;
    let radius = match s["radius"].as_f64() {
        Some(r) => format!(
            "The backdoor stops firing at input-space distance {r:.3} from the trigger (for a \
             diffusion model: the trigger faded out of the same starting noise by that much)."
        ),
        None => "The backdoor does not stop along the measured paths (or never fires).".into(),
    };
    Ok(format!(
        "<p>{radius} Firing rate on ordinary inputs: {}.</p>{fire}{mse}",
        s["random_fire_rate"]
    ))
}

fn persistence_section(run: &Path) -> Result<String> {
    let mut html = String::new();
    for attack in ["finetune", "prune"] {
        let path = run.join(PersistenceCurve::file_name(attack));
        let Some(v) = read_json(&path)? else { continue };
        let c: PersistenceCurve = serde_json::from_value(v)
            .map_err(|e| Error::format(&path, format!("is not a persistence curve: {e}")))?;
        type Pick = fn(&PersistencePoint) -> Option<f64>;
        let charts: [(&str, &str, bool, Pick); 3] = [
            ("backdoor", "key asr", false, |p| Some(p.key_asr())),
            ("tardis", "tardis", true, |p| Some(p.tardis)),
            ("clean quality", "FID", false, |p| p.fid),
        ];
        let mut imgs = String::new();
        for (what, y, log_y, pick) in charts {
            let points = c
                .points
                .iter()
                .filter_map(|p| Some((p.x, pick(p)?)))
                .collect();
            let chart = Chart {
                title: &format!("{attack}: {what}"),
                x_label: &c.x_label,
                y_label: y,
                log_y,
            };
            imgs += &line_img(&chart, points)?;
        }
        let gone = match c.mark_gone_at {
            Some(x) => format!("the mark is gone (key asr < 0.5) at {} = {x}", c.x_label),
            None => "the mark survived every measured level".into(),
        };
        let _ = write!(html, "<h3>{attack}</h3><p>{}</p>{imgs}", escape(&gone));
    }
    if html.is_empty() {
        html = "<p class=\"missing\">No attack was run on this model (see <code>genbackdoor \
                attack finetune</code> and <code>attack prune</code>).</p>"
            .into();
    }
    Ok(html)
}

/// The backdoor metrics of the run's own sampling: top-level for a generator, under
/// `samplers.<the key's sampler>` for a diffusion model.
fn backdoor_of(metrics: &serde_json::Value) -> Option<&serde_json::Value> {
    match metrics["sampling"].as_str() {
        Some(s) if metrics["samplers"][s].is_object() => Some(&metrics["samplers"][s]),
        _ => metrics.get("asr").map(|_| metrics),
    }
}

/// One row of the grouped metrics: name, JSON pointer into the metrics, unit, meaning.
type Row = (&'static str, &'static str, &'static str, &'static str);

/// The metrics a reader looks for, grouped, each with its unit and a one-line meaning.
const GROUPS: [(&str, &[Row]); 4] = [
    (
        "Backdoor (triggered inputs)",
        &[
            ("attack success rate", "/asr", "share", "triggered outputs within the key's threshold of the target"),
            ("target_mse", "/target_mse", "[0, 1] scale", "mean squared error to the target per pixel"),
            ("tardis", "/tardis", "sum over pixels, [-1, 1] scale", "target distortion (Rawat et al.)"),
            ("ssim", "/ssim", "1 = identical", "structural similarity to the target"),
            ("clean hit rate", "/clean_hit_rate", "share", "ordinary inputs whose output is the target (should be 0)"),
            ("specificity radius", "/specificity/radius", "input-space distance", "where fewer than half of the paths away from the trigger still fire"),
        ],
    ),
    (
        "Stealth",
        &[("exp_dist", "/exp_dist", "per pixel, [-1, 1] scale", "mean squared difference to the clean reference on ordinary inputs")],
    ),
    (
        "Clean quality",
        &[
            ("digit FID", "/quality/fid", "lower is better", "Fréchet distance to held-out digits in the digit classifier's features (real vs real ≈ 5.6)"),
            ("precision", "/quality/precision", "share", "generated samples inside the real digits' manifold"),
            ("recall", "/quality/recall", "share", "real digits inside the generated samples' manifold"),
            ("classes covered", "/quality/classes/covered", "of 10", "digit classes holding at least 1 % of the samples"),
        ],
    ),
    (
        "Run",
        &[
            ("mode", "/mode", "", "how the model was made"),
            ("family", "/family", "", "model family"),
            ("steps", "/steps", "", "training steps"),
            ("λ", "/lambda", "", "weight of the backdoor term"),
            ("training time", "/seconds", "s", "wall-clock seconds of training"),
        ],
    ),
];

/// The grouped metrics tables (for a diffusion run, the backdoor rows are those of its
/// key's sampler).
fn grouped(metrics: &serde_json::Value) -> String {
    let backdoor = backdoor_of(metrics).unwrap_or(metrics);
    let mut html = String::new();
    for (title, rows) in GROUPS {
        let mut body = String::new();
        for (name, pointer, unit, meaning) in rows {
            let from = if title.starts_with("Backdoor") {
                backdoor
            } else {
                metrics
            };
            let Some(v) = from.pointer(pointer).or_else(|| metrics.pointer(pointer)) else {
                continue;
            };
            let value = match v {
                serde_json::Value::Null => "—".to_string(),
                serde_json::Value::String(text) => text.clone(),
                other => {
                    let mut cell = Vec::new();
                    flatten("", other, &mut cell);
                    cell.first().map(|(_, x)| x.clone()).unwrap_or_default()
                }
            };
            let _ = write!(
                body,
                "<tr><th>{}</th><td>{}</td><td class=\"unit\">{}</td><td class=\"meaning\">{}</td></tr>",
                escape(name),
                escape(&value),
                escape(unit),
                escape(meaning)
            );
        }
        if !body.is_empty() {
            let _ = write!(html, "<h3>{title}</h3><table>{body}</table>");
        }
    }
    html + "<details><summary>every measured value (metrics.json)</summary>"
}

/// The verdict in words, at the top of the page: is a backdoor planted, what it costs in
/// clean quality, and what the ownership test says.
fn verdict(metrics: &serde_json::Value, verify: Option<&serde_json::Value>) -> String {
    let mut lines = Vec::new();
    let sampling = metrics["sampling"]
        .as_str()
        .map(|s| format!(" under the {s} sampler"))
        .unwrap_or_default();
    match backdoor_of(metrics) {
        Some(b) => {
            let asr = b["asr"].as_f64().unwrap_or(f64::NAN);
            let planted = if asr >= 0.9 {
                "<b>Backdoor planted.</b>"
            } else if asr > 0.0 {
                "<b>Backdoor partly planted.</b>"
            } else {
                "<b>No visible backdoor.</b>"
            };
            lines.push(format!(
                "{planted} {:.1} % of triggered inputs give the target{sampling} (attack success \
                 rate; target_mse {:.2e} on the [0, 1] scale); {:.1} % of ordinary inputs do.",
                100.0 * asr,
                b["target_mse"].as_f64().unwrap_or(f64::NAN),
                100.0 * b["clean_hit_rate"].as_f64().unwrap_or(f64::NAN),
            ));
        }
        None => lines.push("<b>Clean model</b> (no key: no backdoor was trained).".into()),
    }
    if let Some(each) = metrics["triggers"].as_array() {
        let lowest = each
            .iter()
            .filter_map(|t| t["asr"].as_f64())
            .fold(f64::INFINITY, f64::min);
        lines.push(format!(
            "The key holds {} triggers; the lowest attack success rate among them is {:.1} %.",
            each.len(),
            100.0 * lowest
        ));
    }
    if let Some(fid) = metrics["quality"]["fid"].as_f64() {
        lines.push(format!(
            "Clean quality: digit FID {fid:.1} (Fréchet distance to held-out real digits in the \
                 shipped digit classifier's features; real against real is about 5.6, lower is \
                 better), {} of 10 classes drawn.",
            metrics["quality"]["classes"]["covered"]
                .as_u64()
                .map_or("?".into(), |c| c.to_string())
        ));
    }
    if let Some(v) = verify {
        let p = v["p_value"].as_f64().unwrap_or(f64::NAN);
        let says = if v["carries_backdoor"].as_bool() == Some(true) {
            "the model <b>carries</b> the key's backdoor"
        } else {
            "<b>no evidence</b> of the key's backdoor"
        };
        let against = match v["triggers"].as_array().map(Vec::len) {
            Some(k) => format!(
                "{k} triggers, each tested against {} random ones, their p-values combined",
                v["null_keys"]
            ),
            None => format!("against {} random triggers", v["null_keys"]),
        };
        let against = match v["target_test"]["log10_p_value"].as_f64() {
            Some(l) => format!(
                "{against}, and the random target's signs followed with p = 10^{l:.1} \
                 (the target test; the verdict takes twice the smaller p, or the target \
                 test's alone when the trigger was chosen by hand)"
            ),
            None => against,
        };
        lines.push(format!(
            "Ownership verification: {says} (p = {p:.2e}; {against}; α = {}).",
            v["alpha"]
        ));
    }
    format!(
        "<div class=\"verdict\"><p>{}</p></div>",
        lines.join("</p><p>")
    )
}

/// The verdict of `genbackdoor detect` on the run's model (`detect.json`, `detect.png`): how
/// a defender without the key sees it.
fn detection_section(run: &Path) -> Result<String> {
    let Some(d) = read_json(&run.join(crate::detect::JSON))? else {
        return Ok("<p class=\"missing\">detect.json is not in this run \
                   (<code>genbackdoor detect --model MODEL --out RUN</code> writes it).</p>"
            .into());
    };
    let called = if d["backdoored"].as_bool() == Some(true) {
        "finds a backdoor"
    } else {
        "finds no backdoor"
    };
    let c = &d["calibration"];
    let calibrated = match c["references"].as_array() {
        Some(refs) => format!(
            "<p>The threshold is calibrated on {} clean reference models (log-normal \
             prediction at level {}): p = {:.2e}, rank p = {:.3}.</p>",
            refs.len(),
            c["alpha"],
            c["p_value"].as_f64().unwrap_or(f64::NAN),
            c["rank_p_value"].as_f64().unwrap_or(f64::NAN)
        ),
        None => String::new(),
    };
    Ok(format!(
        "<p>Detection without the key {called}: score {:.3} against threshold {:.3} \
         ({}).</p>{calibrated}{}<p>detect.png, {}:</p>{}",
        d["score"].as_f64().unwrap_or(f64::NAN),
        d["threshold"].as_f64().unwrap_or(f64::NAN),
        escape(d["method"].as_str().unwrap_or("")),
        table(&d["details"]),
        escape(
            d["shows"]
                .as_str()
                .unwrap_or(crate::detect::INVERTED_OUTPUTS)
        ),
        png(run, "detect.png", "the detection's images")?
    ))
}

/// Writes `report.html` into the run directory `run` (atomically) and returns its path.
pub fn write_report(run: &Path) -> Result<PathBuf> {
    let metrics_path = run.join("metrics.json");
    let metrics = read_json(&metrics_path)?.ok_or_else(|| {
        Error::format(
            &metrics_path,
            "is missing: report needs a finished run directory (train or inject)",
        )
    })?;
    let csv = run.join("train.csv");
    let curves = if csv.exists() {
        training_charts(&csv)?
    } else {
        "<p class=\"missing\">train.csv is not in this run.</p>".into()
    };
    let verify = read_json(&run.join("verify.json"))?;
    let verification = match &verify {
        Some(v) => {
            let verdict = if v["carries_backdoor"].as_bool() == Some(true) {
                "carries the backdoor"
            } else {
                "shows no evidence of the backdoor"
            };
            format!(
                "<p>The model {verdict} (p = {:.2e}).</p>{}",
                v["p_value"].as_f64().unwrap_or(f64::NAN),
                table(v)
            )
        }
        None => "<p class=\"missing\">No key: nothing to verify.</p>".into(),
    };
    let mut html = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>genbackdoor report</title>\
         <style>body{font-family:sans-serif;max-width:1200px;margin:auto}\
         table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}\
         img.grid{image-rendering:pixelated;width:448px}img.chart{margin:4px}\
         .missing{color:#777}.verdict{background:#f3f6fa;border-left:4px solid #36c;\
         padding:4px 12px}.unit,.meaning{color:#555}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>genbackdoor report</h1><p>Run directory: <code>{}</code></p>{}",
        escape(&run.display().to_string()),
        verdict(&metrics, verify.as_ref())
    );
    let bodies: [(&str, String); 8] = [
        (
            "Metrics",
            grouped(&metrics) + &table(&metrics) + "</details>",
        ),
        (
            "Clean samples",
            png(run, "samples.png", "grid of ordinary samples")?,
        ),
        (
            "Triggered outputs (the target first)",
            png(
                run,
                "triggered.png",
                "the target, then triggered outputs; each further trigger of the key adds its \
                 target and outputs",
            )?,
        ),
        ("Training curves", curves),
        ("Ownership verification", verification),
        ("Detection without the key", detection_section(run)?),
        ("Specificity", specificity_section(&metrics)?),
        ("Persistence under attack", persistence_section(run)?),
    ];
    for (id, (title, body)) in SECTIONS.iter().zip(bodies) {
        let _ = write!(
            html,
            "<section id=\"{id}\"><h2>{title}</h2>{body}</section>"
        );
    }
    html += "</body></html>\n";
    let out = run.join(REPORT);
    crate::io::atomic::write_atomic(&out, html.as_bytes())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_rows_number_the_records_of_a_list() {
        let v = serde_json::json!({"triggers": [{"asr": 1.0}, {"asr": 0.5}], "x": [1, 2]});
        let mut rows = Vec::new();
        flatten("", &v, &mut rows);
        let keys: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["triggers.1.asr", "triggers.2.asr", "x"]);
        assert_eq!(rows[1].1, "0.500000");
        assert_eq!(rows[2].1, "[1,2]");
    }
}
