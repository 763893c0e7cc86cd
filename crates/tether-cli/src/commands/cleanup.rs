//! `tether cleanup --target …`: the by-hand sweep of rules left by dead agents.

use tether_agent::{netns::Netns, rules};

use crate::ui::Ui;

pub(crate) async fn run(target: String, ui: Ui) -> anyhow::Result<i32> {
    let netns = Netns::resolve(&target)?;
    let step = ui.step(&format!("removing rules of dead agents in {target}"));
    let found = rules::leftovers(&netns).await;
    let live = found.iter().filter(|l| l.owner.is_alive()).count();
    let removed = rules::sweep(&netns, |owner| !owner.is_alive()).await;
    let kept = if live > 0 {
        format!("; kept {live} of running agents")
    } else {
        String::new()
    };
    step.done(&format!("removed {removed} table(s)/chain(s){kept}"));
    Ok(0)
}
