//! A deployment as an operator runs it: real `muxgate` processes in cluster mode on a real
//! `redis-server`, behind a real nginx running the shipped `deploy/nginx.conf`. A rolling
//! restart (SIGTERM to the instance holding the streams, then to the other one once the first
//! is back) moves every client through nginx with every stream exact; the SSE front end
//! streams through nginx chunk by chunk.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::instance::{token, Instance};
use common::nginx::Nginx;
use common::redis_server::RedisServer;
use common::{
    expected, http_client, spawn_mock, until_first_delta, Client, StreamRecord, API_KEY, FRAME_WAIT,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

/// The instances' config file: a drain longer than the streams below, and the cap on
/// connections not yet upgraded per client address raised, since behind nginx every client
/// has nginx's address (docs/deploy.md).
const CONFIG: &str =
    "drain_timeout_ms = 30000\n\n[server]\nmax_pending_connections_per_ip = 1024\n";

/// Chunks per stream, 100 ms apart: each stream runs 4 s, so SIGTERM lands mid-stream.
const CHUNKS: usize = 40;

/// The whole deployment on loopback: one Redis, one mock upstream, two instances, nginx.
struct Deployment {
    redis: RedisServer,
    mock: muxgate::mock::MockHandle,
    a: Instance,
    b: Instance,
    nginx: Nginx,
}

impl Deployment {
    async fn start() -> Deployment {
        let redis = RedisServer::start().await;
        let mock = spawn_mock(Some(API_KEY)).await;
        let (upstream, url) = (mock.base_url(), redis.url());
        let (a, b) = tokio::join!(
            Instance::start("gw-a", &upstream, Some(&url), CONFIG),
            Instance::start("gw-b", &upstream, Some(&url), CONFIG),
        );
        let nginx = Nginx::start(&[a.addr, b.addr]).await;
        Deployment {
            redis,
            mock,
            a,
            b,
            nginx,
        }
    }

    /// The instance id holding `user`'s one connection, from the cluster's admin view (bounded
    /// retry: the connection's lease is written as it is admitted). The view names each process
    /// `ID/NONCE`, so a restarted instance is told apart from its predecessor: the ID is returned.
    async fn instance_of(&self, user: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let view = self.b.admin(&format!("/admin/users/{user}")).await;
            let holding: Vec<&String> = view["instances"]
                .as_object()
                .map(|i| {
                    i.iter()
                        .filter(|(_, l)| l["connections"] == 1)
                        .map(|(id, _)| id)
                        .collect()
                })
                .unwrap_or_default();
            if let [id] = holding[..] {
                return id.split('/').next().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "where is {user}'s connection? {view}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Deployment {
    /// A failed test shows what the instances and nginx logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log:\n{}\n--- {} log:\n{}\n--- nginx error log:\n{}",
                self.a.id,
                self.a.log(),
                self.b.id,
                self.b.log(),
                self.nginx.error_log()
            );
        }
    }
}

/// A socket through nginx after `hello` (resuming `resume`) and its `welcome`, and how many
/// attempts it took. Retried every 200 ms for 15 s while nginx has no instance to offer
/// (502), as a client retries.
async fn connect(ws_url: &str, user: &str, resume: Value) -> (Client, Value, u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match tokio_tungstenite::connect_async(ws_url).await {
            Ok((ws, _)) => {
                let mut c = Client { ws };
                c.send(json!({"type":"hello","token":token(user, "pro"),"client":"test/1","resume":resume}))
                    .await;
                let welcome = c.recv().await;
                assert_eq!(welcome["type"], "welcome", "{user}: {welcome}");
                return (c, welcome, attempts);
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{user}: no connection through nginx for 15 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Takes frame `f` into `records`, skipping what a resume replays twice: the new connection
/// replays from the seq the client had when it said `hello`, and the old one may have carried
/// more since (the shim drops those by seq too).
fn take_once(records: &mut HashMap<String, StreamRecord>, f: Value) {
    let Some(r) = f["id"].as_str().and_then(|id| records.get_mut(id)) else {
        return;
    };
    let seen = r.end.is_some() || f["seq"].as_u64().is_some_and(|seq| seq <= r.last_seq);
    if !seen {
        r.take(f);
    }
}

/// One user's client through a restart, as the shim behaves: on `goaway` it keeps reading the
/// old connection (which goes on carrying its streams while the instance drains) while it opens
/// a new one through nginx whose `hello` resumes every unfinished stream after the last seq
/// read; once welcomed, it closes the old one and reads the new one, until every stream has
/// ended. Returns the client, the records, the goaways received, and the attempts each move
/// took to get a connection.
async fn follow(
    mut client: Client,
    ws_url: String,
    user: String,
    mut records: HashMap<String, StreamRecord>,
) -> (Client, HashMap<String, StreamRecord>, Vec<Value>, Vec<u32>) {
    let (mut goaways, mut attempts) = (Vec::new(), Vec::new());
    while records.values().any(|r| r.end.is_none()) {
        let f = client.recv().await;
        if f["type"] != "goaway" {
            take_once(&mut records, f);
            continue;
        }
        goaways.push(f);
        let wanted: Vec<String> = records
            .iter()
            .filter(|(_, r)| r.end.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let resume: Vec<Value> = wanted
            .iter()
            .map(|id| json!({"id": id, "after": records[id].last_seq}))
            .collect();
        let moving = connect(&ws_url, &user, json!(resume));
        tokio::pin!(moving);
        let mut old_open = true;
        let (moved, welcome, tries) = loop {
            tokio::select! {
                done = &mut moving => break done,
                event = client.next_event(), if old_open => match event {
                    common::Event::Frame(f) => take_once(&mut records, f),
                    // The drain ended (1001): the new connection replays the rest.
                    common::Event::Closed(_) => old_open = false,
                },
            }
        };
        // Every stream still running is resumed (one that ended on the old connection
        // meanwhile may be too, while its instance keeps it for replay).
        let resumed: Vec<String> = serde_json::from_value(welcome["resumed"].clone()).unwrap();
        let lost: Vec<&String> = wanted
            .iter()
            .filter(|id| records[*id].end.is_none() && !resumed.contains(id))
            .collect();
        assert!(lost.is_empty(), "{user}: {lost:?} not resumed: {welcome}");
        attempts.push(tries);
        std::mem::replace(&mut client, moved).close().await;
    }
    (client, records, goaways, attempts)
}

/// Opens `per_client` streams on each of `clients` (ids `{tag}{n}`), reads until each has sent
/// a delta; the prompts by id and the records so far, per client.
async fn open_streams(
    clients: &mut [(String, Client)],
    tag: &str,
    total: usize,
) -> (HashMap<String, String>, Vec<HashMap<String, StreamRecord>>) {
    let mut prompts = HashMap::new();
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    for n in 0..total {
        let i = n % clients.len();
        let id = format!("{tag}{n}");
        let prompt = format!("{tag} stream {n}: tell me [[mock chunks={CHUNKS} delay_ms=100]]");
        clients[i].1.open(&id, &prompt).await;
        prompts.insert(id.clone(), prompt);
        ids[i].push(id);
    }
    let mut records = Vec::new();
    for ((_, client), ids) in clients.iter_mut().zip(&ids) {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        records.push(until_first_delta(client, &ids).await);
    }
    (prompts, records)
}

/// SIGTERMs `leaving` while `clients` read `records`; every client follows its streams through
/// nginx. Checks each got one `goaway` (shutdown) and each stream's exact text; returns the
/// moved clients.
async fn restart_under(
    leaving: &mut Instance,
    ws_url: &str,
    clients: Vec<(String, Client)>,
    records: Vec<HashMap<String, StreamRecord>>,
    prompts: &HashMap<String, String>,
) -> Vec<(String, Client)> {
    leaving.terminate();
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(records)
        .map(|((user, client), records)| {
            let (url, u) = (ws_url.to_string(), user.clone());
            (user, tokio::spawn(follow(client, url, u, records)))
        })
        .collect();
    let mut moved = Vec::new();
    for (user, task) in tasks {
        let (client, records, goaways, attempts) = task.await.unwrap();
        assert_eq!(goaways.len(), 1, "{user}: {goaways:?}");
        assert_eq!(goaways[0]["reason"], "shutdown", "{user}: {goaways:?}");
        // nginx went past the stopped instance to a live one at once: no 502 on the way.
        assert_eq!(attempts, [1], "{user}: attempts to reconnect");
        for (id, r) in &records {
            assert_eq!(r.end_type(), "done", "{user} {id}: {:?}", r.end);
            assert_eq!(r.text, expected(&prompts[id], CHUNKS), "{user} {id}");
            assert_eq!(r.deltas, CHUNKS as u64, "{user} {id}");
        }
        moved.push((user, client));
    }
    // The drain ended once its streams had: well inside drain_timeout_ms.
    let status = leaving.exited(Duration::from_secs(40)).await;
    assert!(
        status.success(),
        "{}: {status}\n{}",
        leaving.id,
        leaving.log()
    );
    moved
}

#[tokio::test]
async fn rolling_restart_moves_every_stream_through_nginx_exactly() {
    tokio::time::timeout(Duration::from_secs(150), rolling_restart())
        .await
        .expect("the rolling restart took more than 150 s");
}

async fn rolling_restart() {
    let mut d = Deployment::start().await;
    let ws_url = d.nginx.ws_url();
    // One user per client, so the admin view says which instance each landed on; nginx's
    // least_conn spreads them. Three on A carry the streams; those on B stay connected.
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for n in 0..12 {
        let user = format!("roll-{n}");
        let (client, _, _) = connect(&ws_url, &user, json!([])).await;
        if d.instance_of(&user).await == d.a.id {
            on_a.push((user, client));
        } else {
            on_b.push(client);
        }
        if on_a.len() == 3 {
            break;
        }
    }
    assert_eq!(
        on_a.len(),
        3,
        "nginx sent {} of 12 clients to A",
        on_a.len()
    );
    assert!(!on_b.is_empty(), "nginx balanced nothing to B");

    // A holds 50 streams; SIGTERM mid-stream; every client moves to B and resumes.
    // Each instance's warm-up ran one stream.
    let before = d.mock.stats().requests;
    let (prompts, records) = open_streams(&mut on_a, "a", 50).await;
    let mut moved = restart_under(&mut d.a, &ws_url, on_a, records, &prompts).await;
    assert_eq!(
        d.mock.stats().requests,
        before + 50,
        "no stream was run twice"
    );
    assert_eq!(d.mock.stats().aborted, 0, "no upstream request was cut");
    for (user, _) in &moved {
        assert_eq!(d.instance_of(user).await, d.b.id, "{user} moved to B");
    }

    // The rest of the rolling restart: A comes back where nginx expects it, B goes; the
    // clients move back to A with B's streams.
    d.a = Instance::start_on(
        "gw-a2",
        d.a.port(),
        &d.mock.base_url(),
        Some(&d.redis.url()),
        CONFIG,
    )
    .await;
    drop(on_b);
    let before = d.mock.stats().requests;
    let (prompts, records) = open_streams(&mut moved, "b", 30).await;
    let moved = restart_under(&mut d.b, &ws_url, moved, records, &prompts).await;
    assert_eq!(
        d.mock.stats().requests,
        before + 30,
        "no stream was run twice"
    );
    assert_eq!(d.mock.stats().aborted, 0, "no upstream request was cut");
    // Where they landed, new streams run.
    for (user, mut client) in moved {
        let id = format!("{user}-after");
        client
            .open(&id, "after the restart [[mock chunks=3]]")
            .await;
        let end = client
            .collect(std::slice::from_ref(&id))
            .await
            .remove(&id)
            .unwrap();
        assert_eq!(end.end_type(), "done", "{user}: {:?}", end.end);
    }
    assert!(
        d.nginx
            .error_log()
            .contains("connect() failed (111: Connection refused)"),
        "nginx met the stopped instances and went to the next: {}",
        d.nginx.error_log()
    );
}

#[tokio::test]
async fn the_sse_front_end_streams_through_nginx_chunk_by_chunk() {
    let d = Deployment::start().await;
    let prompt = "an answer through nginx [[mock chunks=8 delay_ms=200]]";
    let res = http_client()
        .post(d.nginx.http_url("/v1/chat/completions"))
        .bearer_auth(token("sse-user", "pro"))
        .json(&json!({"model": "deepseek-v3.2", "stream": true,
                      "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let mut body = res.bytes_stream();
    let (mut buf, mut text, mut done) = (Vec::new(), String::new(), false);
    let mut upstream_at_first_text = None;
    while let Some(bytes) = tokio::time::timeout(FRAME_WAIT, body.next()).await.unwrap() {
        buf.extend_from_slice(&bytes.unwrap());
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let event = std::str::from_utf8(&event).unwrap().trim_end();
            let data = event.strip_prefix("data: ").unwrap();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() else {
                continue;
            };
            if !t.is_empty() && upstream_at_first_text.is_none() {
                upstream_at_first_text = Some(d.mock.stats());
            }
            text.push_str(t);
        }
    }
    assert!(done, "no [DONE]");
    assert_eq!(text, expected(prompt, 8));
    // Not buffered by nginx: the first text came while the upstream was still streaming.
    let at_first = upstream_at_first_text.unwrap();
    assert_eq!(at_first.in_flight, 1, "{at_first:?}");
    assert!(at_first.chunks_sent < 8, "{at_first:?}");
}
