//! The controllers, in process: [`LocalApi`] gives them the API server's object layer (the
//! same defaulting, validation and admission a kubectl request meets, without HTTP), and
//! [`start`] runs them until shutdown.

use std::sync::Arc;

use berth_api::Resource;
use berth_apiserver::decode::DeleteOptions;
use berth_apiserver::error::ApiError as ServerError;
use berth_apiserver::objects::{ListRequest, Objects, Write, prefix, stamped, stamped_json};
use berth_controllers::api::{Api, ApiError, Event, EventStream, Lazy, Listed, Part};
use berth_controllers::drivers::{Driver, Drivers};
use berth_store::{StoreError, WatchEvent};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// [`Api`] over the server's [`Objects`].
#[derive(Debug, Clone)]
pub struct LocalApi {
    pub objects: Objects,
}

fn convert(e: ServerError) -> ApiError {
    let msg = e.to_string();
    match e {
        ServerError::NotFound(_) => ApiError::NotFound(msg),
        ServerError::AlreadyExists(_) => ApiError::AlreadyExists(msg),
        ServerError::Conflict { .. } => ApiError::Conflict(msg),
        ServerError::Gone(_) => ApiError::Gone(msg),
        ServerError::Invalid { .. } | ServerError::Denied { .. } | ServerError::BadRequest(_) => ApiError::Invalid(msg),
        _ => ApiError::Other(msg),
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Gone { .. } => ApiError::Gone(e.to_string()),
        other => ApiError::Other(other.to_string()),
    }
}

fn ns_name(v: &Value) -> (Option<String>, String) {
    let m = &v["metadata"];
    (
        m["namespace"].as_str().filter(|s| !s.is_empty()).map(str::to_owned),
        m["name"].as_str().unwrap_or("").to_owned(),
    )
}

#[async_trait::async_trait]
impl Api for LocalApi {
    async fn list(&self, res: &'static Resource) -> Result<(Vec<Value>, u64), ApiError> {
        let listed = self
            .objects
            .list(res, None, &ListRequest::default())
            .await
            .map_err(convert)?;
        Ok((listed.items, listed.revision))
    }

    async fn list_json(&self, res: &'static Resource) -> Result<(Vec<Listed>, u64), ApiError> {
        let collection = prefix(res, None);
        let (objects, revision) = self.objects.list_stored(res).await.map_err(convert)?;
        let listed = objects
            .into_iter()
            .map(|o| {
                Ok(Listed {
                    key: o.key.strip_prefix(&collection).unwrap_or(&o.key).to_owned(),
                    revision: o.mod_revision,
                    json: stamped_json(&o.value, o.mod_revision).map_err(convert)?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok((listed, revision))
    }

    async fn watch(&self, res: &'static Resource, revision: u64) -> Result<EventStream, ApiError> {
        let collection = prefix(res, None);
        let mut w = self
            .objects
            .store
            .watch(&collection, revision)
            .await
            .map_err(store_error)?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(ev) = w.recv().await {
                let out = match ev {
                    Err(e) => Err(store_error(e)),
                    Ok(WatchEvent::Bookmark(_)) => continue,
                    // The store key is the collection's prefix, then `namespace/name` or
                    // `name`: the informers' key.
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => match o.key.strip_prefix(&collection) {
                        Some(key) => Ok(Event::Changed(Lazy {
                            key: key.to_owned(),
                            revision: o.mod_revision,
                            decode: Box::new(move || stamped_json(&o.value, o.mod_revision).map_err(convert)),
                        })),
                        None => stamped(&o.value, o.mod_revision).map(Event::Modified).map_err(convert),
                    },
                    Ok(WatchEvent::Deleted(o)) => {
                        stamped(&o.value, o.mod_revision).map(Event::Deleted).map_err(convert)
                    }
                };
                let end = out.is_err();
                if tx.send(out).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn get(&self, res: &'static Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects.get(res, ns, name).await.map_err(convert)
    }

    async fn create(&self, res: &'static Resource, obj: Value) -> Result<Value, ApiError> {
        let (ns, _) = ns_name(&obj);
        let answer = self
            .objects
            .create(res, ns.as_deref(), obj, Vec::new(), false)
            .await
            .map_err(convert)?;
        Ok(answer.body)
    }

    async fn update(&self, res: &'static Resource, obj: Value, part: Part) -> Result<Value, ApiError> {
        let (ns, name) = ns_name(&obj);
        let answer = match part {
            Part::Main | Part::Status => {
                self.objects
                    .update(res, ns.as_deref(), &name, obj, Vec::new(), part == Part::Status, false)
                    .await
            }
            Part::Both => self.objects.update_all(res, ns.as_deref(), &name, obj).await,
        }
        .map_err(convert)?;
        Ok(answer.body)
    }

    async fn update_over(&self, res: &'static Resource, old: Value, obj: Value, part: Part) -> Result<Value, ApiError> {
        let (ns, name) = ns_name(&obj);
        let part = match part {
            Part::Main => Write::Main,
            Part::Status => Write::Status,
            Part::Both => Write::Both,
        };
        let answer = self
            .objects
            .update_over(res, ns.as_deref(), &name, old, obj, part)
            .await
            .map_err(convert)?;
        Ok(answer.body)
    }

    async fn delete(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        uid: Option<&str>,
    ) -> Result<(), ApiError> {
        let opts = DeleteOptions {
            uid: uid.map(str::to_owned),
            ..DeleteOptions::default()
        };
        self.objects
            .delete(res, ns, name, &opts, false)
            .await
            .map(|_| ())
            .map_err(convert)
    }
}

/// How many workers each queue runs: enough parallel writes for the store's group commit.
pub const WORKERS: usize = 64;

/// Connects to each CSI driver endpoint (retrying until it answers: the built-in driver starts
/// alongside) and registers it under the name it reports.
fn connect_drivers(endpoints: Vec<String>, stop: watch::Receiver<bool>) -> Arc<Drivers> {
    let drivers = Drivers::new();
    for endpoint in endpoints {
        let drivers = drivers.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut delay = std::time::Duration::from_millis(20);
            loop {
                match Driver::connect(&endpoint).await {
                    Ok(d) => {
                        tracing::info!(driver = %d.name, %endpoint, "CSI driver registered for the controllers");
                        drivers.add(d);
                        return;
                    }
                    Err(e) if delay >= std::time::Duration::from_secs(5) => {
                        tracing::warn!(%endpoint, error = %e, "CSI driver not answering yet");
                    }
                    Err(_) => {}
                }
                if *stop.borrow() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(10));
            }
        });
    }
    drivers
}

/// Starts the controllers over `objects`, calling the CSI drivers at `endpoints`; they stop
/// when `stop` turns true.
pub fn start(objects: Objects, endpoints: Vec<String>, stop: watch::Receiver<bool>) {
    let api: Arc<dyn Api> = Arc::new(LocalApi { objects });
    let drivers = connect_drivers(endpoints.clone(), stop.clone());
    let inf = berth_controllers::Informers::new();
    let events = berth_controllers::events::start(api.clone());
    let pv =
        berth_controllers::pv_controller::PvController::new(api.clone(), inf.clone(), &events, Some(drivers.clone()));
    let protection = berth_controllers::protection::Protection::new(api.clone(), inf.clone());
    let provisioner =
        berth_controllers::provisioner::Provisioner::new(api.clone(), inf.clone(), drivers.clone(), &events);
    let attacher = berth_controllers::attacher::Attacher::new(api.clone(), inf.clone(), drivers.clone(), &events);
    let resizer = berth_controllers::resizer::Resizer::new(api.clone(), inf.clone(), drivers.clone(), &events);
    let snapshotter =
        berth_controllers::snapshotter::Snapshotter::new(api.clone(), inf.clone(), drivers.clone(), &events);
    // This host's Node, CSINode, CSIDrivers and capacities, named by the first driver (the
    // built-in one when the storage roles run); and the scheduler that places pods on it.
    let registration =
        berth_controllers::registration::Registration::new(api.clone(), inf.clone(), drivers, None, endpoints);
    let scheduler = berth_controllers::scheduler::Scheduler::new(api.clone(), inf.clone(), &events);
    inf.start(&api, &stop);
    tokio::spawn(attacher.run(8, stop.clone()));
    tokio::spawn(resizer.run(8, stop.clone()));
    tokio::spawn(snapshotter.run(8, stop.clone()));
    tokio::spawn(provisioner.run(WORKERS, stop.clone()));
    tokio::spawn(registration.run(stop.clone()));
    tokio::spawn(scheduler.run(4, stop.clone()));
    tokio::spawn(pv.run(WORKERS, stop.clone()));
    tokio::spawn(protection.run(8, stop));
}
