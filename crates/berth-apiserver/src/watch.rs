//! Watch: a chunked stream of `{"type":…,"object":…}` lines, one per change, from the store's
//! watch. `resourceVersion` "" or "0" first sends the current objects as ADDED and then the
//! changes after that list; N sends the changes after N; a compacted N gives an ERROR event
//! with a 410 Expired Status, as Kubernetes does. Bookmarks are forwarded when asked for.
//! The stream ends at `timeoutSeconds`, when the client goes away, or when the store stops.
//!
//! With a selector, an object that stops matching is sent as DELETED and one that starts
//! matching as ADDED, as Kubernetes' watch cache does: the watch remembers which keys it has
//! sent as matching (only when there is a selector).

use std::time::Duration;

use berth_api::Resource;
use berth_api::printing::IncludeObject;
use std::collections::HashSet;

use berth_api::selector::{FieldSelector, LabelSelector};
use berth_store::{ListOptions, StoreError, WatchEvent};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::objects::{ListRequest, Objects, prefix, selected, stamped, stamped_json};

/// Kubernetes' default watch timeout is 30 to 60 minutes; one hour here.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// At most one bookmark per this interval reaches the client.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// A parsed watch request.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub res: &'static Resource,
    pub namespace: Option<String>,
    /// Watch one object (the legacy `/watch/{plural}/{name}` path).
    pub name: Option<String>,
    pub list: ListRequest,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    /// Send each object as a one-row Table (`kubectl get -w`).
    pub table: Option<IncludeObject>,
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The line of an event whose object goes out as stored, resourceVersion stamped (no table and
/// no selector needs it parsed): the stored text is spliced, not parsed and serialized again.
fn stored_event_line(kind: &str, stored: &[u8], revision: u64) -> Option<Bytes> {
    let object = stamped_json(stored, revision).ok()?;
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(&object);
    line.extend_from_slice(b"}\n");
    Some(Bytes::from(line))
}

fn expired(requested: &str) -> Bytes {
    let status = ApiError::Gone(format!("too old resource version: {requested}")).status();
    event_line("ERROR", status)
}

/// Starts the watch; the receiver yields the body's chunks.
pub fn start(objects: &Objects, req: WatchRequest) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let prefix = prefix(req.res, req.namespace.as_deref());
    let exact = req
        .name
        .as_ref()
        .map(|n| crate::objects::key(req.res, req.namespace.as_deref(), n));
    let render = move |req: &WatchRequest, obj: Value| -> Value {
        match req.table {
            Some(include) => crate::table::render(req.res, &[obj], include, None, None),
            None => obj,
        }
    };

    let rv = req.resource_version.clone().unwrap_or_default();
    let filtered = req.list.labels != LabelSelector::default() || req.list.fields != FieldSelector::default();
    // Objects go out as stored: nothing needs them parsed.
    let plain =
        req.table.is_none() && req.list.labels.requirements.is_empty() && req.list.fields.requirements.is_empty();
    let knows_past = rv.is_empty() || rv == "0";
    let from_rv = if knows_past {
        None
    } else {
        Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("resourceVersion must be a number, not {rv:?}")))?,
        )
    };
    let store = objects.store.clone();
    let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT);
    // Everything, the initial objects too, is sent from this task, page by page, so a watch of
    // a large collection never holds more than a page and the channel in memory.
    tokio::spawn(async move {
        let mut matching: HashSet<String> = HashSet::new();
        let from = match from_rv {
            Some(n) => n,
            None => {
                let mut after = None;
                let mut at = None;
                loop {
                    let opts = ListOptions {
                        limit: Some(500),
                        continue_after: after,
                        at_revision: at,
                    };
                    let page = match store.list(&prefix, opts).await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(event_line("ERROR", ApiError::from(e).status())).await;
                            return;
                        }
                    };
                    at = Some(page.revision);
                    for o in &page.items {
                        if exact.as_ref().is_some_and(|k| *k != o.key) {
                            continue;
                        }
                        if plain {
                            let Some(line) = stored_event_line("ADDED", &o.value, o.mod_revision) else {
                                continue;
                            };
                            if tx.send(line).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let Ok(v) = stamped(&o.value, o.mod_revision) else {
                            continue;
                        };
                        if selected(&v, &req.list.labels, &req.list.fields) {
                            if filtered {
                                matching.insert(o.key.clone());
                            }
                            if tx.send(event_line("ADDED", render(&req, v))).await.is_err() {
                                return;
                            }
                        }
                    }
                    match page.next {
                        Some(n) => after = Some(n),
                        None => break page.revision,
                    }
                }
            }
        };
        let mut watch = match store.watch(&prefix, from).await {
            Ok(w) => w,
            Err(StoreError::Gone { .. }) => {
                let _ = tx.send(expired(&rv)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(event_line("ERROR", ApiError::from(e).status())).await;
                return;
            }
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut last_bookmark = tokio::time::Instant::now();
        loop {
            let ev = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                ev = watch.recv() => ev,
            };
            let line = match ev {
                None => return,
                Some(Err(StoreError::Gone { .. })) => {
                    let _ = tx.send(expired(&rv)).await;
                    return;
                }
                Some(Err(e)) => {
                    let _ = tx.send(event_line("ERROR", ApiError::from(e).status())).await;
                    return;
                }
                Some(Ok(WatchEvent::Bookmark(rev))) => {
                    if !req.bookmarks || last_bookmark.elapsed() < BOOKMARK_EVERY {
                        continue;
                    }
                    last_bookmark = tokio::time::Instant::now();
                    event_line(
                        "BOOKMARK",
                        json!({
                            "kind": req.res.kind,
                            "apiVersion": req.res.api_version(),
                            "metadata": { "resourceVersion": rev.to_string() },
                        }),
                    )
                }
                Some(Ok(ev)) => {
                    let (kind, o) = match &ev {
                        WatchEvent::Added(o) => ("ADDED", o),
                        WatchEvent::Modified(o) => ("MODIFIED", o),
                        WatchEvent::Deleted(o) => ("DELETED", o),
                        WatchEvent::Bookmark(_) => continue,
                    };
                    if exact.as_ref().is_some_and(|k| *k != o.key) {
                        continue;
                    }
                    if plain {
                        match stored_event_line(kind, &o.value, o.mod_revision) {
                            Some(line) => line,
                            None => continue,
                        }
                    } else {
                        let Ok(v) = stamped(&o.value, o.mod_revision) else {
                            continue;
                        };
                        let now = selected(&v, &req.list.labels, &req.list.fields);
                        let kind = if filtered {
                            transition(kind, now, &o.key, &mut matching, knows_past)
                        } else {
                            now.then_some(kind)
                        };
                        let Some(kind) = kind else { continue };
                        event_line(kind, render(&req, v))
                    }
                }
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Lines joined into one body chunk at most (a chunk is one TLS record and one write).
const CHUNK: usize = 64 * 1024;

/// The body of a watch: each chunk is every line ready at that moment (up to [`CHUNK`] bytes),
/// so that a burst of events costs one write and one TLS record, not one per event.
pub fn body_chunks(rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures::stream::unfold(rx, |mut rx| async move {
        let first = rx.recv().await?;
        let mut chunk: Option<bytes::BytesMut> = None;
        while chunk.as_ref().map_or(first.len(), bytes::BytesMut::len) < CHUNK {
            let Ok(next) = rx.try_recv() else { break };
            chunk
                .get_or_insert_with(|| bytes::BytesMut::from(&first[..]))
                .extend_from_slice(&next);
        }
        let out = chunk.map_or(first, bytes::BytesMut::freeze);
        Some((Ok(out), rx))
    })
}

/// The event a selector-filtered watch sends for a change of `key`, given whether the object
/// matches now and the keys it has sent as matching; `None` to send nothing. A watch that
/// started at a revision does not know what matched before it: a matching object is then
/// MODIFIED (`knows_past` false), a non-matching one it never sent is skipped.
fn transition(
    kind: &'static str,
    matches: bool,
    key: &str,
    sent: &mut HashSet<String>,
    knows_past: bool,
) -> Option<&'static str> {
    let was = sent.contains(key);
    match (kind, was, matches) {
        ("DELETED", true, _) => {
            sent.remove(key);
            Some("DELETED")
        }
        ("DELETED", false, m) => m.then_some("DELETED"),
        (_, false, true) => {
            sent.insert(key.to_owned());
            Some(if kind == "ADDED" || knows_past {
                "ADDED"
            } else {
                "MODIFIED"
            })
        }
        (_, true, true) => Some("MODIFIED"),
        (_, true, false) => {
            sent.remove(key);
            Some("DELETED")
        }
        (_, false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    /// Lines ready together leave as one chunk, in order; a lone line leaves as it is.
    #[tokio::test]
    async fn ready_lines_share_a_chunk() {
        use futures::StreamExt as _;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut body = std::pin::pin!(super::body_chunks(rx));
        for line in ["a\n", "b\n", "c\n"] {
            tx.send(bytes::Bytes::from(line)).await.unwrap();
        }
        assert_eq!(body.next().await.unwrap().unwrap(), "a\nb\nc\n");
        tx.send(bytes::Bytes::from("d\n")).await.unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), "d\n");
        drop(tx);
        assert!(body.next().await.is_none());
    }

    use super::*;

    #[test]
    fn selector_transitions() {
        let mut sent = HashSet::new();
        let t = |k, m, key, sent: &mut HashSet<String>| transition(k, m, key, sent, false);
        assert_eq!(t("ADDED", false, "a", &mut sent), None);
        assert_eq!(
            t("MODIFIED", true, "a", &mut sent),
            Some("MODIFIED"),
            "unknown before the watch"
        );
        assert_eq!(t("MODIFIED", true, "a", &mut sent), Some("MODIFIED"));
        assert_eq!(
            t("MODIFIED", false, "a", &mut sent),
            Some("DELETED"),
            "stopped matching"
        );
        assert_eq!(t("MODIFIED", false, "a", &mut sent), None);
        assert_eq!(t("DELETED", false, "a", &mut sent), None);
        assert_eq!(t("ADDED", true, "b", &mut sent), Some("ADDED"));
        assert_eq!(t("DELETED", true, "b", &mut sent), Some("DELETED"));
        assert!(sent.is_empty());
        // After an initial list the watch knows: starting to match is ADDED.
        assert_eq!(transition("MODIFIED", true, "c", &mut sent, true), Some("ADDED"));
    }
}
