use std::collections::BTreeSet;

use super::*;

fn rules(backend: Backend) -> SessionRules {
    SessionRules {
        backend,
        owner: Owner {
            pid: 0x3fffff,
            start_time: 0xffff_ffff,
        },
        session: "0123456789abcdef".into(),
        listen_port: 40000,
        mesh: None,
    }
}

#[test]
fn names_carry_owner_and_session_and_fit_iptables() {
    assert_eq!(
        rules(Backend::Nft).name(),
        "tether_3fffff_ffffffff_0123456789abcdef"
    );
    let chain = rules(Backend::Legacy).name();
    assert_eq!(chain, "TTH_3fffff_ffffffff_012345");
    assert!(
        chain.len() <= 28,
        "iptables chain names are at most 28 characters"
    );
}

#[test]
fn owners_round_trip_through_names() {
    let owner = Owner {
        pid: 4242,
        start_time: 987_654,
    };
    assert_eq!(owner.to_string().parse::<Owner>(), Ok(owner));
    assert!("nope".parse::<Owner>().is_err());
}

#[test]
fn the_nft_table_redirects_only_local_destinations_and_spares_the_agents_own_sockets() {
    let Plan::Nft(script) = rules(Backend::Nft).setup() else {
        panic!()
    };
    assert!(
        script.contains("set ports { type inet_service; flags timeout; }"),
        "{script}"
    );
    assert!(
        script.contains("fib daddr type local tcp dport @ports tcp flags & (syn | ack) == syn redirect to :40000"),
        "{script}"
    );
    assert!(script.contains("meta mark != 0x54544852"), "{script}");
    assert_eq!(script.matches("hook").count(), 2, "prerouting and output");
}

#[test]
fn ports_expire_unless_refreshed_atomically() {
    let r = rules(Backend::Nft);
    assert_eq!(
        r.add_port(80),
        Plan::Nft(
            "add element ip tether_3fffff_ffffffff_0123456789abcdef ports { 80 timeout 3s }\n"
                .into()
        )
    );
    let Some(Plan::Nft(refresh)) = r.refresh(&BTreeSet::from([80, 81])) else {
        panic!()
    };
    assert_eq!(refresh.lines().count(), 2, "one batch: delete then add");
    assert!(
        refresh.starts_with("delete element")
            && refresh.contains("{ 80 timeout 3s, 81 timeout 3s }"),
        "{refresh}"
    );
    assert_eq!(r.refresh(&BTreeSet::new()), None);
    assert_eq!(rules(Backend::Legacy).refresh(&BTreeSet::from([80])), None);
}

#[test]
fn legacy_teardown_removes_exactly_what_setup_and_ports_added() {
    let r = rules(Backend::Legacy);
    let Plan::Iptables(setup) = r.setup() else {
        panic!()
    };
    // The teardown deletes the jumps it finds listed (see
    // `legacy_teardown_removes_whatever_jumps_the_listing_shows`), then the chain.
    assert_eq!(r.teardown(), Plan::LegacyRemoveChain(r.name()));
    // What setup inserts, a listing shows as `-A` lines, which the teardown turns into `-D`.
    let listing: String = setup
        .iter()
        .filter(|a| a.contains(&"-I".to_owned()))
        .map(|jump| format!("-A {} -j {}\n", jump[3], r.name()))
        .collect();
    assert_eq!(legacy_jump_removals(&listing, &r.name()).len(), 2);
    let Plan::Iptables(add) = r.add_port(80) else {
        panic!()
    };
    let Plan::Iptables(remove) = r.remove_port(80) else {
        panic!()
    };
    assert_eq!(add[0][2], "-A");
    assert!(
        add[0].contains(&"--syn".to_owned()),
        "only connection starts are redirected"
    );
    assert_eq!(remove[0][2], "-D");
    assert_eq!(add[0][3..], remove[0][3..], "removal names the same rule");
}

#[test]
fn leftovers_are_found_in_listings() {
    let nft = "table ip filter\ntable ip tether_1a_2b_cafe\ntable inet tether_bad\ntable ip tether_zz_1_x\n";
    let found = nft_leftovers(nft);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].owner,
        Owner {
            pid: 0x1a,
            start_time: 0x2b
        }
    );
    let legacy = "*nat\n:PREROUTING ACCEPT [0:0]\n:TTH_1a_2b_cafe01 - [0:0]\n-A PREROUTING -j TTH_1a_2b_cafe01\nCOMMIT\n";
    let found = legacy_leftovers(legacy);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "TTH_1a_2b_cafe01");
    assert!(legacy_has_rules(legacy));
    assert!(!legacy_has_rules(
        "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
    ));
}

/// The nat table of a pod with an Istio sidecar (istio-iptables, REDIRECT mode).
const ISTIO_NAT: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
:TTH_3fffff_ffffffff_012345 - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -o lo -m owner --uid-owner 1337 -j TTH_3fffff_ffffffff_012345
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
COMMIT
";

#[test]
fn meshes_are_recognised_by_their_chains() {
    assert_eq!(detect_mesh(ISTIO_NAT), Some(Mesh::istio()));
    let linkerd = "*nat\n:PROXY_INIT_REDIRECT - [0:0]\n:PROXY_INIT_OUTPUT - [0:0]\nCOMMIT\n";
    assert_eq!(detect_mesh(linkerd), Some(Mesh::linkerd()));
    // A sidecar user other than the default, read from the mesh's own exemption rule.
    let custom = "*nat\n:ISTIO_OUTPUT - [0:0]\n-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1400 -j RETURN\n-A ISTIO_OUTPUT -m owner --uid-owner 1400 -j RETURN\nCOMMIT\n";
    assert_eq!(detect_mesh(custom).map(|m| m.proxy_uid), Some(1400));
    assert_eq!(
        detect_mesh("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
        None
    );
}

#[test]
fn under_a_mesh_only_the_sidecars_hop_to_the_app_is_caught() {
    let mut r = rules(Backend::Nft);
    r.mesh = Some(Mesh::istio());
    let Plan::Nft(script) = r.setup() else {
        panic!()
    };
    assert_eq!(
        script.matches("hook").count(),
        1,
        "no prerouting chain: {script}"
    );
    assert!(
        script.contains("oifname \"lo\" meta skuid 1337 ip saddr 127.0.0.6 fib daddr type local tcp dport @ports"),
        "{script}"
    );
    let mut r = rules(Backend::Legacy);
    r.mesh = Some(Mesh::linkerd());
    let Plan::Iptables(commands) = r.setup() else {
        panic!()
    };
    let jumps: Vec<String> = commands
        .iter()
        .map(|c| c.join(" "))
        .filter(|c| c.contains("-j TTH_"))
        .collect();
    assert_eq!(
        jumps,
        ["-t nat -I OUTPUT 1 -o lo -m owner --uid-owner 2102 -j TTH_3fffff_ffffffff_012345"]
    );
}

#[test]
fn the_nft_setup_can_be_applied_twice() {
    let Plan::Nft(script) = rules(Backend::Nft).setup() else {
        panic!()
    };
    let name = rules(Backend::Nft).name();
    assert!(
        script.starts_with(&format!("add table ip {name}\nflush table ip {name}\n")),
        "{script}"
    );
}

#[test]
fn legacy_teardown_removes_whatever_jumps_the_listing_shows() {
    let removals = legacy_jump_removals(ISTIO_NAT, "TTH_3fffff_ffffffff_012345");
    let shown: Vec<String> = removals.iter().map(|c| c.join(" ")).collect();
    assert_eq!(
        shown,
        ["-t nat -D OUTPUT -o lo -m owner --uid-owner 1337 -j TTH_3fffff_ffffffff_012345"]
    );
    assert!(legacy_jump_removals(ISTIO_NAT, "ISTIO_OUTPUT").len() == 1);
}

#[test]
fn the_innermost_pid_is_the_last_of_nspid() {
    let nested = "Name:\ttether-agent\nTgid:\t48213\nNgid:\t0\nPid:\t48213\nPPid:\t48200\nNSpid:\t48213\t7\n";
    assert_eq!(innermost_pid(nested), Some(7));
    assert_eq!(innermost_pid("Name:\tx\nNSpid:\t912\n"), Some(912));
    assert_eq!(innermost_pid("Name:\tx\n"), None);
}
