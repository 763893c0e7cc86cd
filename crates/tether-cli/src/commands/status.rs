//! `tether status` and `tether doctor latency`: ask running `tether exec` sessions (through
//! their status sockets, `proxy::status`) how their link is doing.

use std::path::PathBuf;

use serde_json::Value;

use crate::{proxy::status, ui::Ui};

/// Every running session on this machine, one block each (JSON: one object per line).
pub(crate) async fn run(ui: Ui) -> anyhow::Result<i32> {
    let mut shown = 0;
    for path in status::sockets() {
        let Some(report) = status::ask(&path, "status").await else {
            // A run that died without removing its socket.
            let _ = std::fs::remove_file(&path);
            continue;
        };
        shown += 1;
        if ui.is_json() {
            println!("{report}");
        } else {
            print!("{}", describe(&report));
        }
    }
    if shown == 0 && !ui.is_json() {
        println!(
            "No tether session runs on this machine (status sockets live in {}).",
            status::dir().display()
        );
    }
    Ok(0)
}

fn describe(report: &Value) -> String {
    let text = |key: &str| report[key].as_str().unwrap_or("?").to_owned();
    let number = |key: &str| report[key].as_u64().unwrap_or(0);
    let link = match report["link"].as_str() {
        Some("up") => "up".to_owned(),
        Some("reconnecting") => format!(
            "reconnecting for {:.1} s ({})",
            number("down_ms") as f64 / 1000.0,
            text("reason")
        ),
        Some(other) => format!("{other} ({})", text("reason")),
        None => "?".to_owned(),
    };
    let rtt = report["rtt_us"]
        .as_u64()
        .map_or("not measured yet".to_owned(), |us| {
            format!("{:.2} ms", us as f64 / 1000.0)
        });
    format!(
        "tether {pid}: {command}\n  target      {target}\n  session     {session}\n  link        {link}\n  rtt         {rtt}\n  reconnects  {reconnects}\n  buffered    {frames} frames, {bytes} bytes not yet acknowledged\n",
        pid = number("pid"),
        command = text("command"),
        target = text("target"),
        session = text("session"),
        reconnects = number("reconnects"),
        frames = number("buffered_frames"),
        bytes = number("buffered_bytes"),
    )
}

/// `tether doctor latency`: `count` pings over the session of `pid` (or the only one running).
pub(crate) async fn latency(pid: Option<u32>, count: u32, ui: Ui) -> anyhow::Result<i32> {
    let sockets = status::sockets();
    let path: PathBuf = match pid {
        Some(pid) => status::dir().join(format!("{pid}.sock")),
        None => match sockets.as_slice() {
            [only] => only.clone(),
            [] => anyhow::bail!(
                "no tether session runs on this machine; start one with `tether exec`"
            ),
            _ => anyhow::bail!(
                "{} sessions run; pick one with --pid (see `tether status`)",
                sockets.len()
            ),
        },
    };
    let step = ui.step(&format!("{count} pings over the session"));
    let Some(reply) = status::ask(&path, &format!("latency {count}")).await else {
        step.fail("the session did not answer");
        return Ok(1);
    };
    let mut samples: Vec<u64> = reply["rtt_us"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    samples.sort_unstable();
    let lost = reply["lost"].as_u64().unwrap_or(0);
    let Some((&min, &max)) = samples.first().zip(samples.last()) else {
        step.fail(&format!(
            "no answer to any of {count} pings (is the link down?)"
        ));
        return Ok(1);
    };
    let median = samples[samples.len() / 2];
    let ms = |us: u64| us as f64 / 1000.0;
    step.done(&format!(
        "round trip min {:.2} ms, median {:.2} ms, max {:.2} ms{}",
        ms(min),
        ms(median),
        ms(max),
        if lost > 0 {
            format!(", {lost} lost")
        } else {
            String::new()
        }
    ));
    if ui.is_json() {
        println!("{reply}");
    }
    Ok(0)
}
