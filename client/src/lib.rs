//! A geo-aware client for locus.
//!
//! Why a client of its own: a region forwards a write for a record homed elsewhere, which costs an
//! extra hop between regions, and serves reads from its replica whatever its lag or health. This
//! client learns the deployment from seed URLs and routes for its user, as the SDKs of Cosmos DB,
//! DynamoDB and CockroachDB do:
//! - writes go straight to the record's home, learned from answers and cached (bounded), to the
//!   collection's `default_home` for a new record, or to the nearest region under `homing:
//!   anywhere`;
//! - reads go to the faster of two random healthy regions (latency averages; the power of two
//!   choices), so the nearest carries most reads and a slow region sheds load by itself;
//! - every write carries an `Idempotency-Key`, so one whose answer was lost (a timeout, a `504`)
//!   is sent again safely: the region answers with the first outcome instead of writing twice;
//! - the session token of each write is kept, so reads of that record see it in any region;
//! - a region that fails or times out is ejected for a while that grows with each failure; one
//!   whose `/readyz` probe fails stays out until it answers again; retries go to another region,
//!   within a retry budget.
//!
//! The load-balancing rules are pure and property-tested in [`balance`].

pub mod balance;

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, IF_MATCH, IF_NONE_MATCH};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use balance::{RegionHealth, RetryBudget};

/// How the client finds and treats the deployment.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// URLs of one or more regions; the first that answers `/v1/regions` describes the rest. A
    /// seed's URL is used for the region it is (its peers' advertised URLs for the others).
    pub seeds: Vec<String>,
    /// Bearer token sent with every request.
    pub token: Option<String>,
    pub connect_timeout: Duration,
    /// Per attempt; a write that times out is sent again with its idempotency key.
    pub request_timeout: Duration,
    /// How often the region list is read again.
    pub refresh_every: Duration,
    /// How often every region's `/readyz` is probed (latency, and return from ejection).
    pub probe_every: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: usize,
    /// Retries may add this share of the calls made, plus `retry_reserve`.
    pub retry_ratio: f64,
    pub retry_reserve: f64,
    /// Records whose home and session token are remembered.
    pub cache_capacity: usize,
    /// Read from this region while it is available, instead of balancing (an application
    /// deployed next to one region).
    pub read_preference: Option<String>,
}

impl ClientConfig {
    pub fn new(seeds: impl IntoIterator<Item = impl Into<String>>) -> ClientConfig {
        ClientConfig {
            seeds: seeds.into_iter().map(Into::into).collect(),
            token: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            refresh_every: Duration::from_secs(30),
            probe_every: Duration::from_secs(1),
            max_attempts: 3,
            retry_ratio: 0.2,
            retry_reserve: 10.0,
            cache_capacity: 100_000,
            read_preference: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no seed answered /v1/regions ({seeds:?}): {cause}")]
    Discovery { seeds: Vec<String>, cause: String },
    #[error("no region is available")]
    NoRegion,
    /// The policy's answer when the record's home cannot take the write: nothing was written.
    #[error("the home region {home:?} cannot take the write now: {detail}")]
    HomeUnavailable {
        home: Option<String>,
        retry_after: Option<u64>,
        detail: String,
    },
    /// Every attempt of a write timed out or answered `504`: it may or may not have been made.
    /// Sending it again with the same idempotency key is safe and tells.
    #[error("the write's outcome is unknown (idempotency key {idempotency_key}): {cause}")]
    OutcomeUnknown {
        idempotency_key: String,
        cause: String,
    },
    /// A problem document from a region (4xx, or a 5xx after the retries).
    #[error("{status} {kind}: {detail}")]
    Api {
        status: u16,
        kind: String,
        detail: String,
    },
    #[error("{0}")]
    Transport(String),
}

/// A record as a region shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub collection: String,
    pub key: String,
    pub value: Value,
    pub home: String,
    pub version: Value,
    pub hlc: String,
    pub deleted: bool,
}

/// Concurrent versions (the `siblings` strategy): write with `etag` to resolve them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Siblings {
    pub collection: String,
    pub key: String,
    pub home: String,
    pub siblings: Vec<Value>,
    #[serde(default)]
    pub etag: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Found {
    Record {
        #[serde(flatten)]
        record: Record,
        etag: String,
    },
    Siblings(Siblings),
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Written {
    /// The record as written (`None` for a delete).
    pub record: Option<Record>,
    pub etag: String,
    pub created: bool,
    /// The answer replays an earlier attempt of the same write.
    pub replayed: bool,
    /// Kept at `region` because the home was unreachable (`on_home_unreachable: accept_local`).
    pub failover: bool,
    /// The region that made the write.
    pub region: String,
    pub idempotency_key: String,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    pub records: Vec<Value>,
    pub next: Option<String>,
}

/// Conditions and placement of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Write only if the record's ETag is still this (a read's, or siblings' to resolve them).
    pub if_match: Option<String>,
    /// Write only if the record does not exist.
    pub create_only: bool,
    /// Home region of a new record.
    pub home: Option<String>,
    /// The key to send; a fresh one when `None`. Pass the key of an `OutcomeUnknown` to learn
    /// what became of that write.
    pub idempotency_key: Option<String>,
}

/// Where a read is served.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Consistency {
    /// The nearest healthy region (this client's own writes included, by their session tokens).
    #[default]
    Nearest,
    /// The record's home leader.
    Home,
    /// The nearest region if every region's heartbeats put it at most this far behind, the home
    /// otherwise (`Locus-Max-Staleness`).
    MaxStaleness(Duration),
}

/// A map that forgets its oldest entries beyond `capacity`.
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> Bounded<K, V> {
    fn new(capacity: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// Insert or replace (a replaced entry keeps its age).
    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.map.remove(&oldest);
                }
            }
        }
    }
}

struct Region {
    id: String,
    url: String,
    health: RegionHealth,
}

type RecordKey = (String, String);

/// Where new records of a collection go.
#[derive(Debug, Clone, Default)]
struct Placement {
    default_home: Option<String>,
    anywhere: bool,
}

struct State {
    regions: Vec<Region>,
    /// Which region each seed is (by the `Locus-Region` of its answers): its URL is used for it.
    seed_regions: HashMap<String, String>,
    homes: Bounded<RecordKey, String>,
    sessions: Bounded<RecordKey, String>,
    placements: HashMap<String, Placement>,
    budget: RetryBudget,
}

struct Inner {
    config: ClientConfig,
    http: reqwest::Client,
    state: Mutex<State>,
}

/// The client; cheap to clone. Its background task (refresh and probes) ends with the last clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What took a region out of rotation.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// A request failed: out for a while that grows with each failure in a row.
    Request,
    /// A `/readyz` probe failed: out until the region answers.
    Probe,
}

/// Where an attempt goes.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Region(String),
    Nearest,
}

/// A region's answer.
struct Answer {
    region: String,
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::Transport(format!("{} answered unreadable JSON: {e}", self.region)))
    }

    /// The problem document's type (last segment) and detail.
    fn problem(&self) -> (String, String) {
        let body: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        let kind = body["type"]
            .as_str()
            .and_then(|t| t.rsplit(':').next())
            .unwrap_or("unknown")
            .to_owned();
        let detail = body["detail"].as_str().unwrap_or_default().to_owned();
        (kind, detail)
    }

    fn error(&self) -> Error {
        let (kind, detail) = self.problem();
        if kind == "home-unavailable" {
            return Error::HomeUnavailable {
                home: self.header("locus-home").map(str::to_owned),
                retry_after: self.header("retry-after").and_then(|v| v.parse().ok()),
                detail,
            };
        }
        Error::Api {
            status: self.status.as_u16(),
            kind,
            detail,
        }
    }
}

/// A request, as often as it is attempted. Every call is safe to send again after a timeout: reads
/// are, and every write carries its idempotency key.
struct Call<'a> {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Option<&'a Value>,
}

impl Client {
    /// Learn the deployment from the seeds and start the background refresh and probes.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| Error::Transport(e.to_string()))?;
        let state = State {
            regions: Vec::new(),
            seed_regions: HashMap::new(),
            homes: Bounded::new(config.cache_capacity),
            sessions: Bounded::new(config.cache_capacity),
            placements: HashMap::new(),
            budget: RetryBudget::new(config.retry_ratio, config.retry_reserve),
        };
        let client = Client {
            inner: Arc::new(Inner {
                config,
                http,
                state: Mutex::new(state),
            }),
        };
        client.refresh().await?;
        tokio::spawn(background(Arc::downgrade(&client.inner)));
        Ok(client)
    }

    /// The regions as this client sees them: `(id, url, available, latency average in ms)`.
    pub fn regions(&self) -> Vec<(String, String, bool, Option<f64>)> {
        let now = Instant::now();
        let state = self.inner.state.lock().expect("client state");
        state
            .regions
            .iter()
            .map(|r| {
                (
                    r.id.clone(),
                    r.url.clone(),
                    r.health.available(now),
                    r.health.latency_ms,
                )
            })
            .collect()
    }

    /// Learn which region each seed not yet placed is, from the `Locus-Region` of its answer.
    async fn place_seeds(&self) {
        let config = &self.inner.config;
        for seed in &config.seeds {
            let seed = seed.trim_end_matches('/');
            let placed = self
                .inner
                .state
                .lock()
                .expect("client state")
                .seed_regions
                .values()
                .any(|url| url == seed);
            if placed {
                continue;
            }
            let probe = self
                .authorized(self.inner.http.get(format!("{seed}/healthz")))
                .timeout(config.request_timeout)
                .send()
                .await;
            if let Some(id) = probe.ok().and_then(|answer| {
                answer
                    .headers()
                    .get("locus-region")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            }) {
                self.inner
                    .state
                    .lock()
                    .expect("client state")
                    .seed_regions
                    .insert(id, seed.to_owned());
            }
        }
    }

    /// Read the region list again from any seed or known region.
    pub async fn refresh(&self) -> Result<(), Error> {
        self.place_seeds().await;
        let config = &self.inner.config;
        let mut sources: Vec<String> = config.seeds.clone();
        sources.extend(self.regions().into_iter().map(|(_, url, _, _)| url));
        let mut last_error = String::from("no seed given");
        for source in sources {
            let request = self
                .authorized(self.inner.http.get(format!("{source}/v1/regions")))
                .timeout(config.request_timeout);
            let listed = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    response.json::<Value>().await.map_err(|e| e.to_string())
                }
                Ok(response) => Err(format!("{source} answered {}", response.status())),
                Err(error) => Err(format!("{source}: {error}")),
            };
            match listed {
                Ok(listed) => {
                    self.adopt(&source, &listed);
                    return Ok(());
                }
                Err(error) => last_error = error,
            }
        }
        Err(Error::Discovery {
            seeds: config.seeds.clone(),
            cause: last_error,
        })
    }

    /// Take a `/v1/regions` answer from `source`; health already measured is kept.
    fn adopt(&self, source: &str, listed: &Value) {
        let mut state = self.inner.state.lock().expect("client state");
        let mut regions = Vec::new();
        for entry in listed["regions"].as_array().into_iter().flatten() {
            let Some(id) = entry["id"].as_str() else {
                continue;
            };
            let known = state.regions.iter().find(|r| r.id == id);
            // A seed's own URL wins over the URL its peers advertise, which may be an address
            // only the regions can reach; the region that answered is reachable at `source`.
            let url = state
                .seed_regions
                .get(id)
                .cloned()
                .or_else(|| (entry["self"] == true).then(|| source.to_owned()))
                .or_else(|| entry["api_url"].as_str().map(str::to_owned))
                .or_else(|| known.map(|r| r.url.clone()));
            let Some(url) = url else { continue };
            regions.push(Region {
                id: id.to_owned(),
                url: url.trim_end_matches('/').to_owned(),
                health: known.map(|r| r.health.clone()).unwrap_or_default(),
            });
        }
        if !regions.is_empty() {
            state.regions = regions;
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.inner.config.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Choose the region of an attempt, avoiding those already tried when others are available.
    fn choose(&self, target: &Target, tried: &[String]) -> Option<(String, String)> {
        let now = Instant::now();
        let state = self.inner.state.lock().expect("client state");
        let usable = |r: &Region| r.health.available(now) && !tried.contains(&r.id);
        let by_id = |id: &str| state.regions.iter().find(|r| r.id == id && usable(r));
        let chosen = match target {
            Target::Region(id) => by_id(id),
            Target::Nearest => None,
        }
        .or_else(|| {
            self.inner
                .config
                .read_preference
                .as_deref()
                .and_then(by_id)
                .filter(|_| *target == Target::Nearest)
        })
        .or_else(|| {
            let candidates: Vec<&Region> = state.regions.iter().filter(|r| usable(r)).collect();
            let health: Vec<RegionHealth> = candidates.iter().map(|r| r.health.clone()).collect();
            let mut rng = rand::thread_rng();
            balance::pick(&health, now, |n| rand::Rng::gen_range(&mut rng, 0..n))
                .map(|i| candidates[i])
        })
        // Everything tried or ejected: the least recently failed region is better than none.
        .or_else(|| state.regions.iter().min_by_key(|r| r.health.ejected_until));
        chosen.map(|r| (r.id.clone(), r.url.clone()))
    }

    fn record_health(&self, region: &str, outcome: Result<Duration, Failure>) {
        let mut state = self.inner.state.lock().expect("client state");
        if let Some(r) = state.regions.iter_mut().find(|r| r.id == region) {
            match outcome {
                Ok(latency) => r.health.answered(latency),
                Err(failure) => {
                    tracing::debug!(region, ?failure, "region ejected");
                    match failure {
                        Failure::Request => r.health.failed(Instant::now()),
                        Failure::Probe => r.health.failed_probe(Instant::now()),
                    }
                }
            }
        }
    }

    /// Send `call` to `target`, and on failures of the region (no connection, a timeout, a region
    /// not ready) to others, within the attempts and the retry budget.
    async fn send(&self, target: Target, call: Call<'_>) -> Result<Answer, Error> {
        let config = &self.inner.config;
        self.inner
            .state
            .lock()
            .expect("client state")
            .budget
            .requested();
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<Result<Answer, Error>> = None;
        for attempt in 0..config.max_attempts.max(1) {
            if attempt > 0 {
                let allowed = self
                    .inner
                    .state
                    .lock()
                    .expect("client state")
                    .budget
                    .try_retry();
                if !allowed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20 * (1 << attempt.min(5)))).await;
            }
            let Some((region, url)) = self.choose(&target, &tried) else {
                return Err(Error::NoRegion);
            };
            tried.push(region.clone());
            let mut request = self
                .authorized(
                    self.inner
                        .http
                        .request(call.method.clone(), format!("{url}{}", call.path)),
                )
                .headers(call.headers.clone())
                .timeout(config.request_timeout);
            if let Some(body) = call.body {
                request = request.json(body);
            }
            let started = Instant::now();
            let outcome = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    match response.bytes().await {
                        Ok(body) => Ok(Answer {
                            region: region.clone(),
                            status,
                            headers,
                            body: body.to_vec(),
                        }),
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok(answer) => {
                    // Only an error status has a problem document worth reading.
                    let region_unwell = matches!(answer.status.as_u16(), 502 | 503)
                        && matches!(
                            answer.problem().0.as_str(),
                            "not-ready" | "storage-unavailable" | "contention"
                        );
                    if region_unwell {
                        self.record_health(&region, Err(Failure::Request));
                    } else {
                        self.record_health(&region, Ok(started.elapsed()));
                    }
                    let again = region_unwell || answer.status == StatusCode::GATEWAY_TIMEOUT;
                    last = Some(Ok(answer));
                    if !again {
                        break;
                    }
                }
                Err(error) => {
                    self.record_health(&region, Err(Failure::Request));
                    last = Some(Err(Error::Transport(format!("{region}: {error}"))));
                }
            }
        }
        last.unwrap_or(Err(Error::NoRegion))
    }

    fn learn_home(&self, record: &RecordKey, home: &str) {
        let mut state = self.inner.state.lock().expect("client state");
        state.homes.insert(record.clone(), home.to_owned());
    }

    async fn placement(&self, collection: &str) -> Placement {
        if let Some(known) = self
            .inner
            .state
            .lock()
            .expect("client state")
            .placements
            .get(collection)
        {
            return known.clone();
        }
        let call = Call {
            method: Method::GET,
            path: format!("/v1/collections/{}", encode(collection)),
            headers: HeaderMap::new(),
            body: None,
        };
        let placement = match self.send(Target::Nearest, call).await {
            Ok(answer) if answer.status == StatusCode::OK => {
                let body: Value = answer.json().unwrap_or(Value::Null);
                Placement {
                    default_home: body["policy"]["default_home"].as_str().map(str::to_owned),
                    anywhere: body["policy"]["homing"] == "anywhere",
                }
            }
            // Never configured: the defaults (a new record lives where it is written).
            Ok(answer) if answer.status == StatusCode::NOT_FOUND => Placement::default(),
            _ => return Placement::default(),
        };
        self.inner
            .state
            .lock()
            .expect("client state")
            .placements
            .insert(collection.to_owned(), placement.clone());
        placement
    }

    /// Where a write of `record` goes: its known home, else where a new record would live.
    async fn write_target(&self, record: &RecordKey, options: &WriteOptions) -> Target {
        let placement = self.placement(&record.0).await;
        if placement.anywhere {
            return Target::Nearest;
        }
        let known = self
            .inner
            .state
            .lock()
            .expect("client state")
            .homes
            .get(record)
            .cloned();
        match known
            .or_else(|| options.home.clone())
            .or(placement.default_home)
        {
            Some(home) => Target::Region(home),
            None => Target::Nearest,
        }
    }

    /// Read a record: `None` when it is absent or deleted.
    pub async fn get(&self, collection: &str, key: &str) -> Result<Option<Found>, Error> {
        self.get_with(collection, key, Consistency::Nearest).await
    }

    pub async fn get_with(
        &self,
        collection: &str,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<Found>, Error> {
        let record: RecordKey = (collection.to_owned(), key.to_owned());
        let mut headers = HeaderMap::new();
        let session = self
            .inner
            .state
            .lock()
            .expect("client state")
            .sessions
            .get(&record)
            .cloned();
        if let Some(token) = session.and_then(|t| HeaderValue::from_str(&t).ok()) {
            headers.insert("locus-session", token);
        }
        let mut path = record_path(collection, key);
        let target = match consistency {
            Consistency::Nearest => Target::Nearest,
            Consistency::Home => {
                path.push_str("?consistency=home");
                match self
                    .inner
                    .state
                    .lock()
                    .expect("client state")
                    .homes
                    .get(&record)
                {
                    Some(home) => Target::Region(home.clone()),
                    None => Target::Nearest,
                }
            }
            Consistency::MaxStaleness(bound) => {
                headers.insert(
                    "locus-max-staleness",
                    HeaderValue::from(bound.as_millis() as u64),
                );
                Target::Nearest
            }
        };
        let call = Call {
            method: Method::GET,
            path,
            headers,
            body: None,
        };
        let answer = self.send(target, call).await?;
        let etag = answer.header("etag").unwrap_or_default().to_owned();
        match answer.status {
            StatusCode::OK => {
                let record_body: Record = answer.json()?;
                self.learn_home(&record, &record_body.home);
                Ok(Some(Found::Record {
                    record: record_body,
                    etag,
                }))
            }
            StatusCode::MULTIPLE_CHOICES => {
                let mut siblings: Siblings = answer.json()?;
                siblings.etag = etag;
                self.learn_home(&record, &siblings.home);
                Ok(Some(Found::Siblings(siblings)))
            }
            StatusCode::NOT_FOUND if answer.problem().0 == "not-found" => Ok(None),
            _ => Err(answer.error()),
        }
    }

    /// Write a record's value.
    pub async fn put(&self, collection: &str, key: &str, value: &Value) -> Result<Written, Error> {
        self.put_with(collection, key, value, WriteOptions::default())
            .await
    }

    pub async fn put_with(
        &self,
        collection: &str,
        key: &str,
        value: &Value,
        options: WriteOptions,
    ) -> Result<Written, Error> {
        self.write(Method::PUT, collection, key, Some(value), options)
            .await
    }

    /// Delete a record (a tombstone).
    pub async fn delete(&self, collection: &str, key: &str) -> Result<Written, Error> {
        self.delete_with(collection, key, WriteOptions::default())
            .await
    }

    pub async fn delete_with(
        &self,
        collection: &str,
        key: &str,
        options: WriteOptions,
    ) -> Result<Written, Error> {
        self.write(Method::DELETE, collection, key, None, options)
            .await
    }

    /// Resolve concurrent versions: write `value` over every sibling read.
    pub async fn resolve(&self, siblings: &Siblings, value: &Value) -> Result<Written, Error> {
        let options = WriteOptions {
            if_match: Some(siblings.etag.clone()),
            ..WriteOptions::default()
        };
        self.put_with(&siblings.collection, &siblings.key, value, options)
            .await
    }

    async fn write(
        &self,
        method: Method,
        collection: &str,
        key: &str,
        value: Option<&Value>,
        options: WriteOptions,
    ) -> Result<Written, Error> {
        let record: RecordKey = (collection.to_owned(), key.to_owned());
        let idempotency_key = options
            .idempotency_key
            .clone()
            .unwrap_or_else(new_idempotency_key);
        let mut headers = HeaderMap::new();
        headers.insert(
            "idempotency-key",
            HeaderValue::from_str(&idempotency_key)
                .map_err(|_| Error::Transport("the idempotency key is not a header".into()))?,
        );
        if let Some(tag) = &options.if_match {
            headers.insert(
                IF_MATCH,
                HeaderValue::from_str(tag)
                    .map_err(|_| Error::Transport("the ETag is not a header".into()))?,
            );
        }
        if options.create_only {
            headers.insert(IF_NONE_MATCH, HeaderValue::from_static("*"));
        }
        if let Some(home) = options.home.as_deref() {
            headers.insert(
                "locus-home",
                HeaderValue::from_str(home)
                    .map_err(|_| Error::Transport("the home is not a header".into()))?,
            );
        }
        let target = self.write_target(&record, &options).await;
        let call = Call {
            method,
            path: record_path(collection, key),
            headers,
            body: value,
        };
        let answer = match self.send(target, call).await {
            Ok(answer) if answer.status == StatusCode::GATEWAY_TIMEOUT => {
                return Err(Error::OutcomeUnknown {
                    idempotency_key,
                    cause: answer.problem().1,
                })
            }
            Ok(answer) => answer,
            Err(Error::Transport(cause)) => {
                return Err(Error::OutcomeUnknown {
                    idempotency_key,
                    cause,
                })
            }
            Err(error) => return Err(error),
        };
        if let Some(home) = answer
            .header("locus-home")
            .filter(|_| !answer.status.is_success())
        {
            self.learn_home(&record, home);
        }
        if !answer.status.is_success() {
            return Err(answer.error());
        }
        let record_body: Option<Record> = if answer.status == StatusCode::NO_CONTENT {
            None
        } else {
            Some(answer.json()?)
        };
        // A forwarded answer names the home in Locus-Region; a body names it too.
        let home = record_body
            .as_ref()
            .map(|r| r.home.clone())
            .or_else(|| answer.header("locus-region").map(str::to_owned));
        if let Some(home) = home {
            self.learn_home(&record, &home);
        }
        if let Some(session) = answer.header("locus-session") {
            self.inner
                .state
                .lock()
                .expect("client state")
                .sessions
                .insert(record.clone(), session.to_owned());
        }
        Ok(Written {
            record: record_body,
            etag: answer.header("etag").unwrap_or_default().to_owned(),
            created: answer.status == StatusCode::CREATED,
            replayed: answer.header("idempotent-replayed") == Some("true"),
            failover: answer.header("locus-failover") == Some("true"),
            region: answer
                .header("locus-region")
                .unwrap_or(&answer.region)
                .to_owned(),
            idempotency_key,
        })
    }

    /// One page of a collection's records in key order, from the nearest region.
    pub async fn list(
        &self,
        collection: &str,
        prefix: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<Page, Error> {
        let mut query = Vec::new();
        if let Some(prefix) = prefix {
            query.push(format!("prefix={}", encode(prefix)));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        if let Some(cursor) = cursor {
            query.push(format!("cursor={}", encode(cursor)));
        }
        let mut path = format!("/v1/collections/{}/records", encode(collection));
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        let call = Call {
            method: Method::GET,
            path,
            headers: HeaderMap::new(),
            body: None,
        };
        let answer = self.send(Target::Nearest, call).await?;
        if answer.status != StatusCode::OK {
            return Err(answer.error());
        }
        answer.json()
    }
}

/// Refresh the region list now and then and probe every region's `/readyz`, until the client is
/// dropped.
async fn background(inner: Weak<Inner>) {
    let mut last_refresh = Instant::now();
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let client = Client { inner: strong };
        let every = client.inner.config.probe_every;
        if last_refresh.elapsed() >= client.inner.config.refresh_every {
            if let Err(error) = client.refresh().await {
                tracing::debug!(%error, "region list not refreshed");
            }
            last_refresh = Instant::now();
        }
        let targets: Vec<(String, String)> = client
            .regions()
            .into_iter()
            .map(|(id, url, _, _)| (id, url))
            .collect();
        let probes = targets.into_iter().map(|(id, url)| {
            let client = client.clone();
            async move {
                let started = Instant::now();
                let probe = client
                    .authorized(client.inner.http.get(format!("{url}/readyz")))
                    .timeout(client.inner.config.request_timeout.min(every * 2))
                    .send()
                    .await;
                let outcome = match probe {
                    Ok(response) if response.status().is_success() => Ok(started.elapsed()),
                    _ => Err(Failure::Probe),
                };
                client.record_health(&id, outcome);
            }
        });
        for probe in probes {
            probe.await;
        }
        drop(client);
        tokio::time::sleep(every).await;
    }
}

fn new_idempotency_key() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

fn record_path(collection: &str, key: &str) -> String {
    format!(
        "/v1/collections/{}/records/{}",
        encode(collection),
        encode(key)
    )
}

/// Percent-encode a path segment or query value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_oldest_entries_go_beyond_the_capacity() {
        let mut cache = super::Bounded::new(2);
        cache.insert("a", 1);
        cache.insert("b", 2);
        cache.insert("c", 3);
        assert_eq!(cache.get(&"a"), None);
        assert_eq!(cache.get(&"c"), Some(&3));
        assert_eq!(cache.map.len(), 2);
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(super::encode("a/b c"), "a%2Fb%20c");
        assert_eq!(
            super::record_path("users", "é"),
            "/v1/collections/users/records/%C3%A9"
        );
    }
}
