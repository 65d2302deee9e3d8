//! The agents and recordings a simulated box serves.
//!
//! Recordings are generated deterministically in the 7.x shape (queue fields first, then the 6.5
//! fields), with the 7-digit fractional timestamps seen in the vendor's examples, and serialized
//! once when the dataset is built.

use std::collections::BTreeMap;

/// Every account a simulated box knows, by name.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub accounts: BTreeMap<String, SimAccount>,
    /// Agents generated on request, by `id` only: for load tests over many distinct agents.
    pub synthetic: Option<SyntheticAgents>,
}

/// Ids `first_id .. first_id + count`, each with `calls` recordings, in every account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticAgents {
    pub first_id: u64,
    pub count: u64,
    pub calls: u64,
}

impl SyntheticAgents {
    /// The agent with `id`, if it is in range.
    pub fn agent(&self, id: u64) -> Option<Agent> {
        (self.first_id..self.first_id.saturating_add(self.count))
            .contains(&id)
            .then(|| {
                Agent::generate(
                    id,
                    &format!("Agent {id}"),
                    &format!("agent{id}@synthetic.local"),
                    &format!("sip:agent{id}@synthetic.local"),
                    "00000000-0000-4000-8000-000000000000",
                    self.calls,
                )
            })
    }
}

/// One account ("domain") on the simulated box.
#[derive(Clone)]
pub struct SimAccount {
    /// The `X-Miralix-Shared-Secret` this account requires.
    pub shared_secret: String,
    pub agents: Vec<Agent>,
}

impl std::fmt::Debug for SimAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimAccount")
            .field("shared_secret", &"<redacted>")
            .field("agents", &self.agents.len())
            .finish()
    }
}

/// One agent, reachable by each of its four identifications (all in canonical form).
#[derive(Debug, Clone)]
pub struct Agent {
    pub id: u64,
    pub name: String,
    pub email: String,
    pub sip_uri: String,
    pub sync_id: String,
    /// `(QueueCallId, the element's JSON text)`, in ascending QueueCallId order.
    pub recordings: Vec<(u64, String)>,
}

struct Queue {
    id: u64,
    name: &'static str,
    culture: &'static str,
}

/// The queue a recording of agent `agent_id` at index `n` of its history was taken in.
fn queue_of(agent_id: u64, n: u64) -> &'static Queue {
    &QUEUES[usize::try_from((agent_id + n) % 3).unwrap_or(0)]
}

impl SimAccount {
    /// `GET /queues/{queueId}/calls/recordings`: every recording taken in the queue, after
    /// `from` when given, in ascending QueueCallId order; `None` for a queue the box does not
    /// have.
    pub fn queue_recordings(&self, queue_id: u64, from: Option<u64>) -> Option<String> {
        QUEUES.iter().find(|q| q.id == queue_id)?;
        let mut selected: Vec<(u64, &str)> = self
            .agents
            .iter()
            .flat_map(|agent| {
                agent
                    .recordings
                    .iter()
                    .enumerate()
                    .filter(move |(n, _)| queue_of(agent.id, *n as u64).id == queue_id)
                    .map(|(_, (id, json))| (*id, json.as_str()))
            })
            .filter(|(id, _)| from.is_none_or(|from| *id > from))
            .collect();
        selected.sort_by_key(|(id, _)| *id);
        let elements: Vec<&str> = selected.into_iter().map(|(_, json)| json).collect();
        Some(format!("[{}]", elements.join(",")))
    }

    /// `GET /agents[?state=...]`: the agent directory. `state` is `any`, `loggedIn` (what a
    /// bare `/agents` lists) or `loggedOut`; agents with an odd id are logged in.
    pub fn directory(&self, state: &str) -> Option<String> {
        let wanted: fn(bool) -> bool = match state {
            "any" => |_| true,
            "loggedIn" => |logged_in| logged_in,
            "loggedOut" => |logged_in| !logged_in,
            _ => return None,
        };
        let agents: Vec<serde_json::Value> = self
            .agents
            .iter()
            .filter(|agent| wanted(agent.id % 2 == 1))
            .map(|agent| {
                serde_json::json!({
                    "AgentId": agent.id,
                    "Name": agent.name,
                    "Email": agent.email,
                    "SipUri": agent.sip_uri,
                    "SyncId": agent.sync_id,
                    "State": if agent.id % 2 == 1 { "LoggedIn" } else { "LoggedOut" },
                })
            })
            .collect();
        Some(serde_json::Value::Array(agents).to_string())
    }
}

/// Every queue as a JSON array, or the one with `id` as an object (`None` if there is none).
pub fn queues(id: Option<u64>) -> Option<String> {
    let json =
        |q: &Queue| serde_json::json!({"QueueId": q.id, "QueueName": q.name, "Culture": q.culture});
    match id {
        None => Some(serde_json::Value::Array(QUEUES.iter().map(json).collect()).to_string()),
        Some(id) => QUEUES
            .iter()
            .find(|q| q.id == id)
            .map(|q| json(q).to_string()),
    }
}

const QUEUES: [Queue; 3] = [
    Queue {
        id: 1,
        name: "Support",
        culture: "da-DK",
    },
    Queue {
        id: 2,
        name: "Sales",
        culture: "da-DK",
    },
    Queue {
        id: 7,
        name: "Switchboard EN",
        culture: "en-GB",
    },
];

/// 2024-03-04T08:00:00Z, a Monday: the first generated call.
const FIRST_CALL_UNIX: u64 = 1_709_539_200;

impl Dataset {
    /// The demo box: account `greenbox` with a handful of agents, one of them with no calls.
    pub fn demo(account: &str, shared_secret: &str) -> Self {
        let agents = vec![
            Agent::generate(
                1,
                "Claus Clausen",
                "claus.clausen@greenbox.local",
                "sip:claus@greenbox.local",
                "9b2c41d7-5e0a-4c8e-9f21-3d6a7b8c9e01",
                12,
            ),
            Agent::generate(
                103,
                "Derek Andersen",
                "derek.a@company.local",
                "sip:lp1@company.local",
                "f4fd9e5f-017d-4350-adf8-8dd811bc1a2e",
                40,
            ),
            Agent::generate(
                104,
                "Sofie Holm",
                "sofie.holm@greenbox.local",
                "sip:sofie@greenbox.local",
                "0c7e5a12-88b1-4f3d-a6e4-52d9c0b7f3aa",
                5,
            ),
            Agent::generate(
                105,
                "Mads Nygaard",
                "mads.nygaard@greenbox.local",
                "sip:mads@greenbox.local",
                "5d1f0e2b-7c3a-4b9e-8d6f-a1b2c3d4e5f6",
                0,
            ),
        ];
        let mut accounts = BTreeMap::new();
        accounts.insert(
            account.to_owned(),
            SimAccount {
                shared_secret: shared_secret.to_owned(),
                agents,
            },
        );
        Self {
            accounts,
            synthetic: None,
        }
    }
}

impl Agent {
    /// An agent with `calls` generated recordings.
    pub fn generate(
        id: u64,
        name: &str,
        email: &str,
        sip_uri: &str,
        sync_id: &str,
        calls: u64,
    ) -> Self {
        let recordings = (0..calls)
            .map(|n| {
                let queue_call_id = 47_000 + id * 1_000 + n * 3;
                (queue_call_id, recording_json(id, name, queue_call_id, n))
            })
            .collect();
        Self {
            id,
            name: name.to_owned(),
            email: email.to_owned(),
            sip_uri: sip_uri.to_owned(),
            sync_id: sync_id.to_owned(),
            recordings,
        }
    }

    /// Record one more call, with QueueCallId `queue_call_id`, at the end of the history.
    pub fn add_recording(&mut self, queue_call_id: u64) {
        let n = self.recordings.len() as u64;
        let json = recording_json(self.id, &self.name, queue_call_id, n);
        self.recordings.push((queue_call_id, json));
    }

    /// The JSON array of the recordings after `from` (all of them without it), as the box sends it.
    pub fn recordings_after(&self, from: Option<u64>) -> String {
        let selected: Vec<&str> = self
            .recordings
            .iter()
            .filter(|(id, _)| from.is_none_or(|from| *id > from))
            .map(|(_, json)| json.as_str())
            .collect();
        format!("[{}]", selected.join(","))
    }
}

/// One recording element; every number derives from the agent and call index.
fn recording_json(agent_id: u64, agent_name: &str, queue_call_id: u64, n: u64) -> String {
    let queue = queue_of(agent_id, n);
    let seed = queue_call_id.wrapping_mul(2_654_435_761) % 1_000_000_007;
    let started = FIRST_CALL_UNIX + n * 9_437 + seed % 3_600;
    let duration = 20 + seed % 580;
    let ended = started + duration;
    let call_type = if seed.is_multiple_of(5) {
        "CallbackCall"
    } else {
        "QueueCall"
    };
    let caller = format!("+45{}", 20_000_000 + seed % 79_999_999);
    let file = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}.mp3",
        seed & 0xffff_ffff,
        queue_call_id & 0xffff,
        agent_id & 0xfff,
        n & 0xfff,
        seed.wrapping_mul(31) & 0xffff_ffff_ffff
    );
    let value = serde_json::json!({
        "QueueId": queue.id,
        "QueueName": queue.name,
        "QueueCallId": queue_call_id,
        "QueueCallType": call_type,
        "Culture": queue.culture,
        "ConversationStartedUtc": timestamp(started, seed % 10_000_000),
        "ConversationEndedUtc": timestamp(ended, (seed / 7) % 10_000_000),
        "AgentName": agent_name,
        "AgentId": agent_id,
        "RecordingFileName": file,
        "Caller": caller,
    });
    value.to_string()
}

/// `2024-03-04T08:00:00.1234567Z` from UNIX seconds and 100-ns ticks.
fn timestamp(unix: u64, ticks: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ticks:07}Z",
        secs / 3_600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's days-to-civil algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_list_their_recordings_in_order_and_the_directory_filters_by_state() {
        let dataset = Dataset::demo("greenbox", "s");
        let account = &dataset.accounts["greenbox"];
        let mut total = 0;
        for queue in [1, 2, 7] {
            let list: Vec<serde_json::Value> =
                serde_json::from_str(&account.queue_recordings(queue, None).unwrap()).unwrap();
            assert!(list.iter().all(|r| r["QueueId"] == queue));
            let ids: Vec<u64> = list
                .iter()
                .map(|r| r["QueueCallId"].as_u64().unwrap())
                .collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending");
            let after: Vec<serde_json::Value> =
                serde_json::from_str(&account.queue_recordings(queue, Some(ids[2])).unwrap())
                    .unwrap();
            assert_eq!(after.len(), ids.len() - 3);
            total += ids.len();
        }
        let every: usize = account.agents.iter().map(|a| a.recordings.len()).sum();
        assert_eq!(total, every, "each recording is in exactly one queue");
        assert!(account.queue_recordings(3, None).is_none());
        let all: Vec<serde_json::Value> =
            serde_json::from_str(&account.directory("any").unwrap()).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[1]["AgentId"], 103);
        assert_eq!(all[1]["Email"], "derek.a@company.local");
        let logged_in: Vec<serde_json::Value> =
            serde_json::from_str(&account.directory("loggedIn").unwrap()).unwrap();
        assert!(logged_in.iter().all(|a| a["State"] == "LoggedIn"));
        assert_eq!(logged_in.len(), 3);
        assert!(account.directory("busy").is_none());
    }

    #[test]
    fn timestamps_are_calendar_dates() {
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00.0000000Z");
        assert_eq!(
            timestamp(FIRST_CALL_UNIX, 1_696_606),
            "2024-03-04T08:00:00.1696606Z"
        );
        assert_eq!(timestamp(951_782_400, 0), "2000-02-29T00:00:00.0000000Z");
    }

    #[test]
    fn recordings_are_valid_json_in_the_7x_shape_and_filter_by_id() {
        let agent = Agent::generate(
            103,
            "Derek",
            "d@x.y",
            "sip:d@x.y",
            "f4fd9e5f-017d-4350-adf8-8dd811bc1a2e",
            40,
        );
        let all: Vec<serde_json::Value> =
            serde_json::from_str(&agent.recordings_after(None)).unwrap();
        assert_eq!(all.len(), 40);
        let first = all[0].as_object().unwrap();
        let keys: Vec<&str> = first.keys().map(String::as_str).collect();
        assert!(keys.contains(&"QueueCallId") && keys.contains(&"RecordingFileName"));
        let third_id = agent.recordings[2].0;
        let after: Vec<serde_json::Value> =
            serde_json::from_str(&agent.recordings_after(Some(third_id))).unwrap();
        assert_eq!(after.len(), 37);
        assert!(
            after
                .iter()
                .all(|r| r["QueueCallId"].as_u64().unwrap() > third_id)
        );
        assert_eq!(agent.recordings_after(Some(u64::MAX)), "[]");
    }
}
