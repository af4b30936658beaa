//! A re-read window (DBLog's watermarks): one chunk of a table that
//! `walnats snapshot` asked for, read on the SQL side between a low and a
//! high watermark while the stream goes on.
//!
//! [`Windows`] starts the next chunk when the queue in the checkpoint has
//! a table and none is under way; [`Window`] notes the primary key of every
//! change to that table between its watermarks, and at the high watermark
//! hands over the chunk minus the rows changed inside it (the streamed
//! change is as new or newer). A change it cannot key (a truncate, an
//! unchanged TOASTed key, too many keys) means the chunk is read again.
//! Publishing the chunk is the session's: it goes out through the outlet
//! (`publish`) as one atomic batch that the checkpoint announces first.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::{debug, warn};

use super::catalog::{self, Chunk};
use super::reread::{self, Watermark};
use crate::checkpoint::Reread;
use crate::error::{Error, Kind, Result};
use crate::event::{Op, RelationCache, RelationInfo};
use crate::pgoutput::{OldTuple, TupleData, TupleValue};

/// Keys a window remembers before it gives up on its chunk.
pub const MAX_WINDOW_KEYS: usize = 100_000;

/// The chunk between its watermarks.
pub struct Window {
    id: String,
    oid: u32,
    pk: Vec<String>,
    /// The table as the catalog describes it now, for the reads.
    rel: Arc<RelationInfo>,
    task: Option<JoinHandle<Result<Chunk>>>,
    chunk: Option<Chunk>,
    /// The low watermark arrived.
    open: bool,
    /// Primary keys changed between the low and the high watermark.
    changed: HashSet<Vec<String>>,
    /// A change whose key the window could not tell: read the chunk again.
    unknown: bool,
}

impl Drop for Window {
    /// A session that ends mid-window must not leave its reader running on
    /// the session's SQL connection (which holds the slot lock).
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

fn reader_failed(e: tokio::task::JoinError) -> Error {
    Error::new(Kind::Io, format!("snapshot chunk reader failed: {e}"))
}

impl Window {
    /// A row change streamed while the window may be open.
    pub fn observe_row(
        &mut self,
        rel: &RelationInfo,
        op: Op,
        old: Option<&OldTuple>,
        new: Option<&TupleData>,
    ) {
        if !self.open || self.unknown || self.oid != rel.oid.0 {
            return;
        }
        let old = old.map(|o| match o {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        });
        for t in [old, new].into_iter().flatten() {
            match key_of(rel, &self.pk, t) {
                Some(k) => {
                    self.changed.insert(k);
                }
                None => self.unknown = true,
            }
        }
        if op == Op::Delete && old.is_none() {
            self.unknown = true;
        }
        // A window held open long (a transaction in progress at its low
        // watermark that does not end) must not grow without bound: past
        // this many keys the chunk is read again instead.
        if self.changed.len() > MAX_WINDOW_KEYS {
            self.unknown = true;
        }
        if self.unknown {
            self.changed = HashSet::new();
        }
    }

    /// Opens the window at its own low watermark; whether this is its own
    /// high watermark.
    fn on_watermark(&mut self, content: &[u8]) -> bool {
        match reread::parse_watermark(content) {
            Some(Watermark::Low(id)) if id == self.id => {
                self.open = true;
                false
            }
            Some(Watermark::High(id)) => id == self.id,
            _ => false,
        }
    }

    /// A truncate streamed while the window may be open.
    pub fn observe_truncate(&mut self, oid: u32) {
        if self.open && self.oid == oid {
            self.unknown = true;
        }
    }

    /// At the high watermark: the rows to publish as reads, and the table
    /// as described for them; `None` when the chunk must be read again.
    pub async fn finish(mut self) -> Result<Option<(Chunk, Arc<RelationInfo>)>> {
        let mut chunk = match (self.chunk.take(), self.task.take()) {
            (Some(c), _) => c,
            (None, Some(t)) => t.await.map_err(reader_failed)??,
            (None, None) => return Ok(None),
        };
        if self.unknown || !self.open {
            debug!("re-read chunk saw a change it cannot key; reading it again");
            return Ok(None);
        }
        without_changed(&mut chunk, &self.changed);
        Ok(Some((chunk, Arc::clone(&self.rel))))
    }
}

/// What [`Windows::start`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// Nothing to start: a window is under way, or the queue is empty.
    No,
    Yes,
    /// The queue's first table cannot be re-read (gone, unpublished, no
    /// primary key, row security): take it off the queue.
    Abandoned,
}

/// The window under way, if any, and what starts the next one.
pub struct Windows {
    current: Option<Window>,
    opened: u64,
    /// Tells this session's watermarks from a dead one's, and from any a
    /// database user writes: 128 random bits, never guessable.
    run_id: String,
    sql: Arc<Client>,
    /// Where the watermarks go (the primary, when `sql` is a standby).
    marks: reread::Marks,
    /// A request that could not start was warned about.
    warned: bool,
    publication: String,
    server_version_num: u32,
    /// Rows and bytes per chunk: `snapshot.chunk_rows` (at most
    /// [`super::CHUNK_ROWS`], so that a `_schema` message fits in the
    /// atomic batch too) and `snapshot.chunk_bytes`.
    chunk: (usize, usize),
}

impl Windows {
    pub fn new(
        sql: Arc<Client>,
        marks: reread::Marks,
        publication: &str,
        server_version_num: u32,
        reading: &crate::config::SnapshotReading,
    ) -> Result<Windows> {
        Ok(Windows {
            current: None,
            opened: 0,
            run_id: crate::nonce::new()?,
            sql,
            marks,
            warned: false,
            publication: publication.to_owned(),
            server_version_num,
            chunk: (
                reading.chunk_rows.min(super::CHUNK_ROWS),
                reading.chunk_bytes,
            ),
        })
    }

    /// Starts reading the next chunk of `head` (the queue's first table)
    /// when no window is under way: low watermark, SELECT, high watermark
    /// on the SQL side, in a task of its own.
    pub async fn start(
        &mut self,
        head: Option<&Reread>,
        cache: &mut RelationCache,
    ) -> Result<Started> {
        let Some(r) = head.filter(|_| self.current.is_none()) else {
            return Ok(Started::No);
        };
        if matches!(self.marks, reread::Marks::Nowhere) {
            // The queue waits in the checkpoint for a session that can.
            if !std::mem::replace(&mut self.warned, true) {
                warn!(schema = %r.target.schema, table = %r.target.table,
                    "snapshot of table not started: {}", reread::NO_PRIMARY);
            }
            return Ok(Started::No);
        }
        let plan = catalog::plan(
            &self.sql,
            &self.publication,
            r.target.oid,
            self.server_version_num,
        )
        .await?;
        let why = match &plan {
            None => Some("it is gone or no longer published".to_owned()),
            Some(p) => match (p.row_security_refusal(), &p.unkeyed) {
                (Some(e), _) => Some(e.to_string()),
                (None, Some(why)) => Some(why.clone()),
                (None, None) if !p.has_primary_key() => Some("it has no primary key".to_owned()),
                (None, None) => None,
            },
        };
        let plan = match (plan, why) {
            (Some(p), None) => p,
            (_, why) => {
                let why = why.unwrap_or_default();
                warn!(schema = %r.target.schema, table = %r.target.table, "snapshot of table abandoned: {why}");
                return Ok(Started::Abandoned);
            }
        };
        let rel = cache.describe(&plan.relation).await?;
        self.opened += 1;
        let id = format!("{}-{}", self.run_id, self.opened);
        let (sql, marks) = (Arc::clone(&self.sql), self.marks.clone());
        let (task_id, after, pk) = (id.clone(), r.after.clone(), plan.pk_names.clone());
        let (rows, bytes) = self.chunk;
        let task = tokio::spawn(async move {
            reread::read_window(&sql, &marks, &plan, &after, &task_id, rows, bytes).await
        });
        self.current = Some(Window {
            id,
            oid: r.target.oid,
            pk,
            rel,
            task: Some(task),
            chunk: None,
            open: false,
            changed: HashSet::new(),
            unknown: false,
        });
        Ok(Started::Yes)
    }

    /// Whether a window is under way (being read, or open in the stream).
    pub fn under_way(&self) -> bool {
        self.current.is_some()
    }

    /// The session's SQL connection (it holds the slot lock).
    pub fn sql(&self) -> &Client {
        &self.sql
    }

    /// Whether the chunk is still being read.
    pub fn reading(&self) -> bool {
        self.current.as_ref().is_some_and(|w| w.task.is_some())
    }

    /// Waits for the chunk's read to end (forever when none runs).
    pub async fn read(&mut self) -> Result<()> {
        let Some(t) = self.current.as_mut().and_then(|w| w.task.as_mut()) else {
            return std::future::pending().await;
        };
        let chunk = t.await.map_err(reader_failed)??;
        if let Some(w) = self.current.as_mut() {
            w.task = None;
            w.chunk = Some(chunk);
        }
        Ok(())
    }

    pub fn current(&mut self) -> Option<&mut Window> {
        self.current.as_mut()
    }

    /// A `walnats.watermark` message: opens the window at its low
    /// watermark, hands it over at its high one; anything else (another
    /// session's, a database user's) is ignored.
    pub fn on_watermark(&mut self, content: &[u8]) -> Option<Window> {
        let at_high = self.current.as_mut()?.on_watermark(content);
        if at_high { self.current.take() } else { None }
    }
}

/// The primary key of a streamed row, as text, or `None` when the tuple
/// does not carry all of it (an unchanged TOASTed key, an old key of
/// another index): the window then cannot tell, and the chunk is read
/// again.
fn key_of(rel: &RelationInfo, pk: &[String], t: &TupleData) -> Option<Vec<String>> {
    let mut out = Vec::with_capacity(pk.len());
    for name in pk {
        let i = rel.columns.iter().position(|c| &c.name == name)?;
        match t.get(i)? {
            TupleValue::Text(b) => out.push(String::from_utf8(b.to_vec()).ok()?),
            _ => return None,
        }
    }
    Some(out)
}

/// The chunk's rows minus those whose key changed inside the window.
fn without_changed(chunk: &mut Chunk, changed: &HashSet<Vec<String>>) {
    if changed.is_empty() {
        return;
    }
    let mut keep = Vec::with_capacity(chunk.rows.len());
    let mut keys = Vec::with_capacity(chunk.keys.len());
    for (row, key) in std::mem::take(&mut chunk.rows)
        .into_iter()
        .zip(std::mem::take(&mut chunk.keys))
    {
        if !changed.contains(&key) {
            keep.push(row);
            keys.push(key);
        }
    }
    chunk.rows = keep;
    chunk.keys = keys;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Cursor;
    use crate::event::testing::test_relation;

    fn text(s: &str) -> TupleValue<'_> {
        TupleValue::Text(s.as_bytes())
    }

    fn row(id: &str) -> TupleData {
        TupleData::from_values(vec![text(id), text("x")])
    }

    /// A window on `public.t` (OID 16384, key `id`) whose chunk of ids 1..=5
    /// is read.
    fn window() -> Window {
        let rows: Vec<TupleData> = (1..=5).map(|i| row(&i.to_string())).collect();
        let keys = (1..=5).map(|i| vec![i.to_string()]).collect();
        Window {
            id: "run-1".to_owned(),
            oid: 16_384,
            pk: vec!["id".to_owned()],
            rel: test_relation("public", "t"),
            task: None,
            chunk: Some(Chunk {
                rows,
                keys,
                end: Cursor::Key {
                    values: vec!["5".to_owned()],
                },
                last: false,
            }),
            open: false,
            changed: HashSet::new(),
            unknown: false,
        }
    }

    fn ids(chunk: &Chunk) -> Vec<String> {
        chunk.keys.iter().map(|k| k[0].clone()).collect()
    }

    async fn close(mut w: Window) -> Option<Vec<String>> {
        assert!(
            w.on_watermark(b"high:run-1"),
            "the window's own high watermark"
        );
        w.finish().await.unwrap().map(|(c, _)| ids(&c))
    }

    #[tokio::test]
    async fn rows_changed_inside_the_window_are_dropped_from_the_chunk() {
        let mut ws = window();
        let rel = test_relation("public", "t");
        // Before the low watermark: the SELECT saw it; kept.
        ws.observe_row(&rel, Op::Update, None, Some(&row("1")));
        assert!(!ws.on_watermark(b"low:run-1"));
        ws.observe_row(&rel, Op::Update, None, Some(&row("2")));
        let old = OldTuple::Key(row("4"));
        ws.observe_row(&rel, Op::Delete, Some(&old), None);
        assert_eq!(
            close(ws).await,
            Some(vec!["1".into(), "3".into(), "5".into()])
        );
    }

    #[tokio::test]
    async fn other_tables_and_other_watermarks_change_nothing() {
        let mut ws = window();
        ws.on_watermark(b"low:run-1");
        let other = crate::event::testing::relation(
            99,
            "public",
            "u",
            crate::pgoutput::ReplicaIdentity::Default,
            vec![crate::event::testing::column(
                "id",
                crate::value::ValueKind::Int,
                true,
            )],
        );
        ws.observe_row(&other, Op::Update, None, Some(&row("2")));
        ws.observe_truncate(99);
        // A database user's (or a dead session's) watermarks.
        assert!(!ws.on_watermark(b"high:run-2"));
        assert!(!ws.on_watermark(b"high:other-1"));
        assert!(!ws.on_watermark(b"\xff"));
        assert_eq!(close(ws).await.map(|v| v.len()), Some(5));
    }

    #[tokio::test]
    async fn a_change_it_cannot_key_means_read_again() {
        let rel = test_relation("public", "t");
        // A truncate of the table.
        let mut ws = window();
        ws.on_watermark(b"low:run-1");
        ws.observe_truncate(16_384);
        assert_eq!(close(ws).await, None);
        // A key column not in the tuple (an unchanged TOASTed key).
        let mut ws = window();
        ws.on_watermark(b"low:run-1");
        let unchanged = TupleData::from_values(vec![TupleValue::Unchanged, text("x")]);
        ws.observe_row(&rel, Op::Update, None, Some(&unchanged));
        assert_eq!(close(ws).await, None);
        // A delete without its old key.
        let mut ws = window();
        ws.on_watermark(b"low:run-1");
        ws.observe_row(&rel, Op::Delete, None, None);
        assert_eq!(close(ws).await, None);
    }

    #[tokio::test]
    async fn a_window_whose_low_watermark_never_came_is_read_again() {
        assert_eq!(close(window()).await, None);
    }

    #[tokio::test]
    async fn too_many_keys_mean_read_again_not_unbounded_memory() {
        let rel = test_relation("public", "t");
        let mut ws = window();
        ws.on_watermark(b"low:run-1");
        for i in 0..=MAX_WINDOW_KEYS {
            ws.observe_row(&rel, Op::Insert, None, Some(&row(&format!("k{i}"))));
        }
        assert!(ws.changed.is_empty(), "the keys are let go");
        assert_eq!(close(ws).await, None);
    }
}
