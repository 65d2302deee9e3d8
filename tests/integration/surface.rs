//! The read surface beyond one agent's list: recordings per queue and the agent directory,
//! each through the same cache (coalescing, selection, delta refresh, purge), and access
//! control on every route.

use std::time::Duration;

use serde_json::Value;

use crate::support::{ACCOUNT, API_KEY, Gateway, SECRET, ids, list_fetches, request, sample};

fn queue(id: &str) -> String {
    format!("/mot/{ACCOUNT}/queues/{id}/calls/recordings")
}

const FOREGROUND: &str =
    "ttl = \"30s\"\nstale_while_revalidate = \"0s\"\nfull_refresh_interval = \"2m\"";

#[tokio::test]
async fn a_queue_list_is_cached_selected_from_and_refreshed_by_delta() {
    let gw = Gateway::plain(FOREGROUND, "").await;
    let list = queue("2");
    let first = gw.get(&list).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-cache"), Some("MISS"));
    gw.settled().await;
    assert_eq!(first.body, gw.box_answer(&list).await, "byte for byte");
    let all = ids(&first.body);
    assert!(all.len() > 10, "queue 2 has {} recordings", all.len());
    let asked = gw.simulator.request_count();

    // A spelling with leading zeros is the same queue; fromQueueCallId is selected from the
    // stored list.
    let again = gw.get(&queue("0002")).await;
    assert_eq!(again.header("x-cache"), Some("HIT"));
    let after = all[all.len() / 2];
    let selected = gw.get(&format!("{list}?fromQueueCallId={after}")).await;
    assert_eq!(selected.header("x-cache"), Some("HIT"));
    let expected: Vec<u64> = all.iter().copied().filter(|id| *id > after).collect();
    assert_eq!(ids(&selected.body), expected);
    assert_eq!(gw.simulator.request_count(), asked, "the box was not asked");

    // New calls (a third of them in each queue) arrive by delta after the TTL.
    let added = gw.simulator.add_calls(ACCOUNT, 103, 6);
    gw.clock.advance(Duration::from_secs(31));
    let refreshed = gw.get(&list).await;
    assert_eq!(refreshed.status, 200);
    let received = gw.simulator.received();
    assert_eq!(
        received.last().unwrap().target,
        format!("{list}?fromQueueCallId={}", all.last().unwrap()),
        "the refresh asked only for what is new"
    );
    let whole = gw.box_answer(&list).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&refreshed.body).unwrap(),
        serde_json::from_slice::<Value>(&whole).unwrap()
    );
    let new: Vec<u64> = ids(&whole)
        .into_iter()
        .filter(|id| added.contains(id))
        .collect();
    assert!(!new.is_empty(), "some of {added:?} were taken in queue 2");
    let metrics = gw.metrics().await;
    let fetches = |kind: &str| sample(&metrics, &list_fetches(kind));
    assert_eq!((fetches("full"), fetches("delta")), (1.0, 1.0));
}

#[tokio::test]
async fn queue_ids_are_checked_and_an_unknown_queue_is_a_remembered_404() {
    let gw = Gateway::plain("ttl = \"30s\"\nnegative_ttl = \"5s\"", "").await;
    for bad in ["abc", "-1", "1.5", "99999999999999999999", "%2E%2E"] {
        let reply = gw.get(&queue(bad)).await;
        assert_eq!(reply.status, 400, "{bad}");
        assert!(reply.text().contains("queueId"), "{bad}: {}", reply.text());
    }
    assert_eq!(gw.simulator.request_count(), 0, "refused before the box");
    let missing = gw.get(&queue("55")).await;
    assert_eq!(missing.status, 404);
    let again = gw.get(&queue("55")).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.header("x-cache"), Some("HIT"));
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn the_directory_has_its_own_ttl_and_takes_only_allowed_states() {
    let gw = Gateway::plain(
        "ttl = \"30s\"\ndirectory_ttl = \"60s\"\nstale_while_revalidate = \"0s\"",
        "",
    )
    .await;
    let directory = format!("/mot/{ACCOUNT}/agents");
    let any = gw.get(&format!("{directory}?state=any")).await;
    assert_eq!(any.status, 200, "{}", any.text());
    assert_eq!(any.header("x-cache"), Some("MISS"));
    let agents: Vec<Value> = serde_json::from_slice(&any.body).unwrap();
    assert!(
        agents
            .iter()
            .all(|a| a["AgentId"].is_u64() && a["Email"].is_string())
    );
    assert_eq!(
        any.body,
        gw.box_answer(&format!("{directory}?state=any")).await
    );
    // A bare /agents is the box's logged-in list: another entry, fewer agents.
    let bare = gw.get(&directory).await;
    assert_eq!(bare.header("x-cache"), Some("MISS"));
    assert!(
        serde_json::from_slice::<Vec<Value>>(&bare.body)
            .unwrap()
            .len()
            < agents.len()
    );
    let asked = gw.simulator.request_count();

    // Any case of an allowed state is the same entry, sent to the box as configured.
    let upper = gw.get(&format!("{directory}?STATE=ANY")).await;
    assert_eq!(upper.header("x-cache"), Some("HIT"));
    assert_eq!(upper.body, any.body);
    for refused in [
        "state=all",
        "state=",
        "state=any&state=any",
        "page=2",
        "state=any&x=1",
    ] {
        let reply = gw.get(&format!("{directory}?{refused}")).await;
        assert_eq!(reply.status, 400, "{refused}");
        let text = reply.text();
        assert!(text.contains("state"), "{refused}: {text}");
    }
    let refused = gw.get(&format!("{directory}?state=all")).await.text();
    assert!(refused.contains("any, loggedIn, loggedOut"), "{refused}");
    assert_eq!(
        gw.simulator.request_count(),
        asked,
        "nothing refused reached the box"
    );

    // Past the list TTL but within directory_ttl: still a hit; past directory_ttl: fetched.
    gw.clock.advance(Duration::from_secs(45));
    assert_eq!(
        gw.get(&format!("{directory}?state=any"))
            .await
            .header("x-cache"),
        Some("HIT")
    );
    gw.clock.advance(Duration::from_secs(16));
    assert_eq!(
        gw.get(&format!("{directory}?state=any"))
            .await
            .header("x-cache"),
        Some("MISS")
    );
    assert_eq!(gw.simulator.request_count(), asked + 1);
    let received = gw.simulator.received();
    assert_eq!(
        received.last().unwrap().target,
        format!("{directory}?state=any")
    );
    // The directory is not a recordings list: counted apart from the full list fetches.
    let metrics = gw.metrics().await;
    let fetches = |kind: &str| sample(&metrics, &list_fetches(kind));
    // `state=any`, the bare list, and `state=any` again past directory_ttl.
    assert_eq!((fetches("full"), fetches("other")), (0.0, 3.0));
}

#[tokio::test]
async fn an_operator_refreshes_the_directory_and_it_is_stored_for_the_directory_ttl() {
    let gw = Gateway::plain(
        "ttl = \"30s\"\ndirectory_ttl = \"60s\"\nstale_while_revalidate = \"0s\"",
        "",
    )
    .await;
    let directory = format!("/mot/{ACCOUNT}/agents");
    assert_eq!(gw.get(&directory).await.header("x-cache"), Some("MISS"));
    gw.settled().await;
    gw.clock.advance(Duration::from_secs(50));
    let asked = gw.simulator.request_count();
    let refreshed = gw
        .admin("POST", &format!("/cache/{ACCOUNT}/agents/refresh"))
        .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text());
    let answer = refreshed.json();
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["refreshed"], true);
    assert!(answer["recordings"].is_null(), "not a recordings list");
    assert_eq!(gw.simulator.request_count(), asked + 1);
    assert_eq!(gw.simulator.received().last().unwrap().target, directory);
    // Stored anew for directory_ttl: 50 s on, past the list TTL, it is still a hit.
    gw.clock.advance(Duration::from_secs(50));
    let hit = gw.get(&directory).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(answer["bytes"], hit.body.len());
    assert_eq!(hit.body, gw.box_answer(&directory).await);
    assert_eq!(
        gw.simulator.request_count(),
        asked + 2,
        "and the direct read"
    );
    let wrong = gw
        .admin("GET", &format!("/cache/{ACCOUNT}/agents/refresh"))
        .await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("POST"));
}

#[tokio::test]
async fn directory_states_are_configurable() {
    let gw = Gateway::plain("ttl = \"30s\"", "directory_states = [\"loggedOut\"]").await;
    let directory = format!("/mot/{ACCOUNT}/agents");
    assert_eq!(
        gw.get(&format!("{directory}?state=loggedout")).await.status,
        200
    );
    let refused = gw.get(&format!("{directory}?state=any")).await;
    assert_eq!(refused.status, 400);
    assert!(
        refused.text().contains("use one of: loggedOut"),
        "{}",
        refused.text()
    );
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn queues_and_the_directory_are_purged_refreshed_and_listed() {
    let gw = Gateway::plain("ttl = \"30s\"", "").await;
    let directory = format!("/mot/{ACCOUNT}/agents");
    for target in [
        queue("1"),
        format!("{}?fromQueueCallId=5", queue("7")),
        queue("7"),
        directory.clone(),
        format!("{directory}?state=any"),
        format!("/mot/{ACCOUNT}/agents/id/103/recordings"),
    ] {
        assert_eq!(gw.get(&target).await.status, 200, "{target}");
    }
    let listing = gw.admin("GET", &format!("/cache/{ACCOUNT}")).await.json();
    let kinds: Vec<(String, String)> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["identification"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("queue", "1"),
        ("queue", "7"),
        ("directory", ""),
        ("directory", "any"),
    ] {
        assert!(
            kinds.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} in {kinds:?}"
        );
    }

    let purged = gw
        .admin("DELETE", &format!("/cache/{ACCOUNT}/queues/7"))
        .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(
        purged.json()["purged"],
        1,
        "queue 7's full list; fromQueueCallId was selected"
    );
    let purged = gw
        .admin("DELETE", &format!("/cache/{ACCOUNT}/agents"))
        .await;
    assert_eq!(purged.json()["purged"], 2, "both directory entries");
    let asked = gw.simulator.request_count();
    assert_eq!(
        gw.get(&queue("1")).await.header("x-cache"),
        Some("HIT"),
        "another queue stays"
    );
    assert_eq!(gw.get(&queue("7")).await.header("x-cache"), Some("MISS"));
    assert_eq!(gw.simulator.request_count(), asked + 1);

    gw.simulator.add_calls(ACCOUNT, 103, 3);
    let refreshed = gw
        .admin("POST", &format!("/cache/{ACCOUNT}/queues/1/refresh"))
        .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text());
    assert_eq!(refreshed.json()["status"], 200);
    assert_eq!(
        gw.simulator.received().last().unwrap().target,
        queue("1"),
        "an operator's refresh fetches the whole list"
    );
    let now = gw.get(&queue("1")).await;
    assert_eq!(now.header("x-cache"), Some("HIT"));
    assert_eq!(now.body, gw.box_answer(&queue("1")).await);
}

#[tokio::test]
async fn every_route_needs_the_accounts_key_before_anything_is_looked_up() {
    let gw = Gateway::plain("ttl = \"30s\"", &format!("api_keys = [\"{API_KEY}\"]")).await;
    let routes = [
        queue("1"),
        format!("/mot/{ACCOUNT}/agents"),
        format!("/mot/{ACCOUNT}/agents?state=any"),
        format!("/mot/{ACCOUNT}/agents?state=bogus"),
        format!("/mot/{ACCOUNT}/queues/calls/recordings/1"),
        format!("/mot/{ACCOUNT}/agents/id/103/recordings"),
    ];
    for target in &routes {
        let anonymous = gw.get(target).await;
        assert_eq!(anonymous.status, 401, "{target}");
        let wrong = request(
            gw.addr,
            "GET",
            target,
            &[("X-Api-Key", "not-the-key-0123456789")],
        )
        .await;
        assert_eq!(wrong.status, 401, "{target}");
    }
    assert_eq!(gw.simulator.request_count(), 0, "nothing reached the box");
    // With its own key (and nothing of the box's), an app reads every one of them.
    let audio = format!(
        "/mot/{ACCOUNT}/queues/calls/recordings/{}",
        47_000 + 103 * 1_000
    );
    for target in routes[..3].iter().chain([&audio, &routes[5]]) {
        let reply = request(gw.addr, "GET", target, &[("X-Api-Key", API_KEY)]).await;
        assert!(
            reply.status == 200 && !reply.body.is_empty(),
            "{target}: {}",
            reply.status
        );
    }
}

/// Two allowlisted reads: one queue (cached 30 s) and the queue list (passed through).
const PASSTHROUGH: &str = r#"
[[accounts.greenbox.passthrough]]
path = "/queues/{id:int}"
ttl = "30s"

[[accounts.greenbox.passthrough]]
path = "/mot/{account}/queues"
query = { culture = ["da-DK", "en-GB"], page = "int" }
ttl = "0s"
"#;

#[tokio::test]
async fn allowlisted_reads_reach_the_box_with_the_secret_and_are_cached_by_their_ttl() {
    let gw = Gateway::plain("ttl = \"30s\"", PASSTHROUGH).await;
    let queue = gw.get(&format!("/mot/{ACCOUNT}/queues/0002")).await;
    assert_eq!(queue.status, 200, "{}", queue.text());
    assert_eq!(queue.json()["QueueName"], "Sales");
    assert_eq!(queue.header("x-cache"), Some("MISS"));
    assert_eq!(
        gw.simulator.received().last().unwrap().target,
        format!("/mot/{ACCOUNT}/queues/2"),
        "the box is asked for the canonical path"
    );
    assert_eq!(
        gw.get(&format!("/mot/{ACCOUNT}/queues/2"))
            .await
            .header("x-cache"),
        Some("HIT")
    );
    assert_eq!(
        gw.get(&format!("/mot/{ACCOUNT}/queues/55")).await.status,
        404
    );
    assert_eq!(gw.simulator.request_count(), 2);

    // ttl = "0s": every request is passed on, with its parameters in canonical form.
    for _ in 0..2 {
        let list = gw
            .get(&format!("/mot/{ACCOUNT}/queues?PAGE=01&culture=da-DK"))
            .await;
        assert_eq!(list.status, 200);
        assert_eq!(list.json().as_array().unwrap().len(), 3);
    }
    assert_eq!(gw.simulator.request_count(), 4);
    assert_eq!(
        gw.simulator.received().last().unwrap().target,
        format!("/mot/{ACCOUNT}/queues?culture=da-DK&page=1")
    );
    // Past the TTL the stored read is fetched again.
    gw.clock.advance(Duration::from_secs(31));
    let again = gw.get(&format!("/mot/{ACCOUNT}/queues/2")).await;
    assert_ne!(again.header("x-cache"), Some("HIT"));
}

#[tokio::test]
async fn nothing_outside_the_allowlist_reaches_the_box() {
    let gw = Gateway::plain("ttl = \"30s\"", PASSTHROUGH).await;
    let long = format!("/mot/{ACCOUNT}/queues/{}", "1".repeat(3000));
    let hostile: Vec<(String, u16)> = [
        ("/mot/greenbox/queues/2/", 404),
        ("/mot/greenbox/queues/2/members", 404),
        ("/mot/greenbox/queues/x", 404),
        ("/mot/greenbox/queues/-1", 404),
        ("/mot/greenbox/queues/1.5", 404),
        ("/mot/greenbox/queues/99999999999999999999", 404),
        ("/mot/greenbox/queues/%2E%2E", 404),
        ("/mot/greenbox/queues/..", 404),
        ("/mot/greenbox/queues/../agents", 404),
        ("/mot/greenbox/queues/1%2F..%2F..%2Fadmin", 404),
        ("/mot/greenbox/queues/1%00", 404),
        ("/mot/greenbox/queues/%FF", 404),
        ("/mot/greenbox/queues//2", 404),
        ("/mot/greenbox//queues/2", 404),
        ("/mot/greenbox/QUEUES/2", 404),
        ("/mot/greenbox/Queues", 404),
        ("/mot/greenbox/queues/", 404),
        ("/mot/greenbox/./queues/2", 404),
        ("/mot/greenbox/queues/%32%2F", 404),
        ("/mot/greenbox/queues/2%3Fx=1", 404),
        ("/mot/greenbox/settings", 404),
        ("/mot/greenbox/agents/id/103", 404),
        ("/mot/greenbox/agents/id/103/recordings/x", 404),
        ("/mot/greenbox/queues/calls/1", 404),
        ("/mot/greenbox/call/answer", 404),
        ("/mot/otherbox/queues/2", 404),
        ("/mot/GREENBOX/queues/2", 404),
        ("/mot/green%62ox/queues/2x", 404),
        ("/mot/../mot/greenbox/queues/2", 404),
        ("/mot", 404),
        ("/mot/", 404),
        ("/mot/greenbox", 404),
        ("/queues/2", 404),
        ("/mot/greenbox/queues?page=x", 400),
        ("/mot/greenbox/queues?culture=fr-FR", 400),
        ("/mot/greenbox/queues?page=1&page=2", 400),
        ("/mot/greenbox/queues?admin=1", 400),
        ("/mot/greenbox/queues/2?x=1", 400),
    ]
    .into_iter()
    .map(|(path, status)| (path.to_owned(), status))
    .chain([(long, 414)])
    .collect();
    assert!(hostile.len() >= 30);
    for (target, status) in &hostile {
        let reply = gw.get(target).await;
        assert_eq!(reply.status, *status, "{target}: {}", reply.text());
        assert!(reply.json()["error"].is_string(), "{target}");
    }
    // Only GET and HEAD, and no body.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let reply = request(
            gw.addr,
            method,
            &format!("/mot/{ACCOUNT}/queues/2"),
            &[("Content-Length", "0")],
        )
        .await;
        assert_eq!(reply.status, 405, "{method}");
    }
    let refused = gw.get("/mot/greenbox/queues?culture=fr-FR").await.text();
    assert!(refused.contains("one of da-DK, en-GB"), "{refused}");
    let unknown = gw.get("/mot/greenbox/queues?admin=1").await.text();
    assert!(unknown.contains("allowed: culture, page"), "{unknown}");
    assert_eq!(gw.simulator.request_count(), 0, "nothing reached the box");
    // HEAD of an allowed read: its headers, no body.
    let head = request(gw.addr, "HEAD", &format!("/mot/{ACCOUNT}/queues/2"), &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn a_passthrough_table_that_would_leave_the_account_is_refused() {
    let config = |entry: &str| {
        format!(
            "[accounts.greenbox]\nbase_url = \"http://127.0.0.1:1\"\nshared_secret = \"{SECRET}\"\n[[accounts.greenbox.passthrough]]\n{entry}\n"
        )
    };
    for (entry, expected) in [
        (
            "path = \"/mot/other/queues\"\nttl = \"1s\"",
            "outside this account",
        ),
        (
            "path = \"/queues/../agents\"\nttl = \"1s\"",
            "\"..\" segment",
        ),
        ("path = \"/queues//x\"\nttl = \"1s\"", "empty segment"),
        ("path = \"/queues/\"\nttl = \"1s\"", "empty segment"),
        ("path = \"queues\"\nttl = \"1s\"", "must start with '/'"),
        (
            "path = \"/queues/%2e%2e\"\nttl = \"1s\"",
            "may only contain",
        ),
        (
            "path = \"/queues/{id:float}\"\nttl = \"1s\"",
            "unknown kind",
        ),
        ("path = \"/queues/{id:int}\"", "ttl: missing"),
        ("path = \"/agents\"\nttl = \"1s\"", "serves itself"),
        (
            "path = \"/queues/{id:int}/calls/recordings\"\nttl = \"1s\"",
            "serves itself",
        ),
        (
            "path = \"/queues/calls/recordings/{id:token}\"\nttl = \"1s\"",
            "serves itself",
        ),
        (
            "path = \"/queues\"\nttl = \"1s\"\nquery = { page = \"float\" }",
            "unknown kind",
        ),
        (
            "path = \"/queues\"\nttl = \"1s\"\nmethod = \"POST\"",
            "method",
        ),
    ] {
        let text = config(entry);
        let error = miralix_gateway::config::from_toml_str(&text, "test.toml")
            .expect_err(entry)
            .to_string();
        assert!(error.contains(expected), "{entry}: {error}");
        assert!(error.contains("passthrough"), "{entry}: {error}");
    }
}

#[tokio::test]
async fn allowlisted_reads_need_the_accounts_key() {
    let gw = Gateway::plain(
        "ttl = \"30s\"",
        &format!("api_keys = [\"{API_KEY}\"]\n{PASSTHROUGH}"),
    )
    .await;
    let target = format!("/mot/{ACCOUNT}/queues/2");
    assert_eq!(gw.get(&target).await.status, 401);
    assert_eq!(gw.simulator.request_count(), 0);
    let allowed = request(gw.addr, "GET", &target, &[("X-Api-Key", API_KEY)]).await;
    assert_eq!(allowed.status, 200);
}
