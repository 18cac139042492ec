//! The blocking side of a download: the writer owns the `.part` file, the SHA-256 (on a
//! hashing thread of its own) and a sans-I/O `LineChecker`. Only whole, checked lines
//! are written, byte-for-byte as served, so a checkpoint is always at a line boundary.
//! It runs on a thread of its own, or inline on the download's task
//! ([`Offload::Inline`]).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::PathBuf;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Checkpoint, Validator};
use crate::error::{Error, Result};
use crate::ndjson::{FeedError, LineChecker};
use crate::offload::Offload;
use crate::url_util::SafeUrl;

pub(super) enum Command {
    /// A response body starts. `restart`: truncate to zero first.
    Begin {
        restart: bool,
        gzip: bool,
        validator: Option<Validator>,
        reply: oneshot::Sender<Result<()>>,
    },
    Data(Bytes),
    /// The body ended, as `End` says.
    EndOfBody {
        end: End,
        reply: oneshot::Sender<Result<Ended>>,
    },
    Finish {
        reply: oneshot::Sender<Result<Stats>>,
    },
}

/// How a response body ended, as the transfer framing tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The framing (Content-Length, chunked terminator) says the body is whole.
    Complete,
    /// The body broke off.
    Broken,
    /// The connection closed with no framing to say whether that was the end.
    Unframed,
}

/// Where the file stands after a body ended.
#[derive(Debug, Clone)]
pub(super) struct Ended {
    /// The durable, whole-line position.
    pub checkpoint: Checkpoint,
    /// Bytes of the file received: the checkpoint plus a last line that may be partial.
    pub received: u64,
    /// The file is complete and finished (its last line checked).
    pub finished: bool,
    /// Why the body counts as broken although the connection closed normally.
    pub cut: Option<String>,
}

pub(super) struct Stats {
    pub bytes: u64,
    pub resources: u64,
    pub sha256: String,
    pub issues: Vec<String>,
    pub ehr_errors: u64,
}

/// Bytes a gzip decoder has produced but the checker has not taken yet.
type Decoded = Vec<u8>;

/// SHA-256 on its own thread, so hashing overlaps with checking and writing (either alone
/// is a large share of the per-byte cost; see docs/benchmarks.md).
struct HashPipe {
    sender: Option<std::sync::mpsc::SyncSender<HashMessage>>,
    thread: Option<std::thread::JoinHandle<Sha256>>,
    /// Hashing on the writer's own thread instead ([`Offload::Inline`]).
    here: Option<Sha256>,
}

enum HashMessage {
    Data(Bytes),
    Reset,
}

impl HashPipe {
    fn start(mut hasher: Sha256) -> HashPipe {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<HashMessage>(64);
        let thread = std::thread::Builder::new()
            .name("fhirhaul-sha256".into())
            .spawn(move || {
                for message in receiver {
                    match message {
                        HashMessage::Data(bytes) => hasher.update(&bytes),
                        HashMessage::Reset => hasher = Sha256::new(),
                    }
                }
                hasher
            })
            .ok();
        HashPipe {
            sender: Some(sender),
            thread,
            here: None,
        }
    }

    fn here(hasher: Sha256) -> HashPipe {
        HashPipe {
            sender: None,
            thread: None,
            here: Some(hasher),
        }
    }

    fn send(&mut self, message: HashMessage) -> std::io::Result<()> {
        if let Some(hasher) = &mut self.here {
            match message {
                HashMessage::Data(bytes) => hasher.update(&bytes),
                HashMessage::Reset => *hasher = Sha256::new(),
            }
            return Ok(());
        }
        match &self.sender {
            Some(sender) => sender
                .send(message)
                .map_err(|_| std::io::Error::other("the hashing thread stopped")),
            None => Err(std::io::Error::other("the hashing thread stopped")),
        }
    }

    fn update(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(hasher) = &mut self.here {
            hasher.update(bytes);
            return Ok(());
        }
        self.send(HashMessage::Data(Bytes::copy_from_slice(bytes)))
    }

    fn finish(mut self) -> std::io::Result<String> {
        if let Some(hasher) = self.here.take() {
            return Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect());
        }
        drop(self.sender.take());
        let hasher = self
            .thread
            .take()
            .and_then(|thread| thread.join().ok())
            .ok_or_else(|| std::io::Error::other("the hashing thread could not start or panicked"))?;
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// The blocking side: owns the `.part` file, the hasher and the line checker.
pub(super) struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: HashPipe,
    written: u64,
    checker: LineChecker,
    gzip: Option<flate2::write::GzDecoder<Decoded>>,
    validator: Option<Validator>,
    checkpoint_every: u64,
    last_checkpoint: u64,
    checkpoints: Option<watch::Sender<Checkpoint>>,
    url: SafeUrl,
}

impl Writer {
    /// Runs on the writer's own thread, or inline on the download's task with
    /// [`Offload::Inline`]: the offload seam is the choice between the two.
    #[allow(clippy::disallowed_methods)]
    pub(super) fn open(
        path: PathBuf,
        resume: &Checkpoint,
        mut checker: LineChecker,
        checkpoint_every: u64,
        checkpoints: Option<watch::Sender<Checkpoint>>,
        url: SafeUrl,
        offload: Offload,
    ) -> Result<Writer> {
        let mut hasher = Sha256::new();
        let file = if resume.offset > 0 {
            // Continue a partial file: cut it back to the checkpoint and re-hash what stays.
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io("opening partial file", &path, e))?;
            let length = file.metadata().map_err(|e| Error::io("reading", &path, e))?.len();
            if length < resume.offset {
                return Err(Error::io(
                    "resuming",
                    &path,
                    std::io::Error::other(format!(
                        "partial file has {length} bytes but the checkpoint says {}",
                        resume.offset
                    )),
                ));
            }
            file.set_len(resume.offset)
                .map_err(|e| Error::io("truncating", &path, e))?;
            let mut buffer = vec![0u8; 1 << 16];
            let mut reader = (&file).take(resume.offset);
            // An `error` file's OperationOutcomes (how many report errors, and what they
            // say) are not in the checkpoint: read them again from the kept lines.
            let mut recounted = checker.reads_outcomes();
            loop {
                let n = reader.read(&mut buffer).map_err(|e| Error::io("reading", &path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                if recounted {
                    recounted = checker.feed(&buffer[..n], &mut |_| Ok(())).is_ok();
                }
            }
            file.seek(std::io::SeekFrom::End(0))
                .map_err(|e| Error::io("seeking", &path, e))?;
            let agrees = recounted && checker.lines() == resume.lines && checker.pending_bytes() == 0;
            if !agrees {
                checker.resume_from(resume.lines, resume.resources);
            }
            file
        } else {
            crate::private_fs::create_file(&path).map_err(|e| Error::io("creating", &path, e))?
        };
        Ok(Writer {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: if offload.is_inline() {
                HashPipe::here(hasher)
            } else {
                HashPipe::start(hasher)
            },
            written: resume.offset,
            checker,
            gzip: None,
            validator: resume.validator.clone(),
            checkpoint_every,
            last_checkpoint: resume.offset,
            checkpoints,
            url,
        })
    }

    /// The writer thread's loop.
    pub(super) fn run(mut self, mut commands: mpsc::Receiver<Command>) -> Result<()> {
        while let Some(command) = commands.blocking_recv() {
            if let Some(reply) = self.handle(command)? {
                let _ = reply.send(self.finish());
                return Ok(());
            }
        }
        self.abandoned();
        Ok(())
    }

    /// The same loop as a task on the caller's runtime ([`Offload::Inline`]).
    pub(super) async fn run_here(mut self, mut commands: mpsc::Receiver<Command>) -> Result<()> {
        while let Some(command) = commands.recv().await {
            if let Some(reply) = self.handle(command)? {
                let _ = reply.send(self.finish());
                return Ok(());
            }
        }
        self.abandoned();
        Ok(())
    }

    /// The download stopped before its end (cancelled, or a failure on the async side):
    /// make every whole line written so far durable and publish it as a checkpoint, so a
    /// resume continues from here rather than from the last periodic checkpoint.
    fn abandoned(&mut self) {
        tracing::debug!(
            written = self.written,
            last_checkpoint = self.last_checkpoint,
            "download stopped before its end"
        );
        if self.checkpoints.is_none() || self.written <= self.last_checkpoint {
            return;
        }
        if let Err(error) = self.sync_checkpoint() {
            tracing::warn!(%error, "could not record a checkpoint for the stopped download");
        }
    }

    /// One command; the reply to send the finished file's stats to, once it is asked for.
    fn handle(&mut self, command: Command) -> Result<Option<oneshot::Sender<Result<Stats>>>> {
        match command {
            Command::Begin {
                restart,
                gzip,
                validator,
                reply,
            } => {
                let _ = reply.send(self.begin(restart, gzip, validator));
            }
            Command::Data(chunk) => self.data(&chunk)?,
            Command::EndOfBody { end, reply } => {
                let _ = reply.send(self.end_of_body(end));
            }
            Command::Finish { reply } => return Ok(Some(reply)),
        }
        Ok(None)
    }

    fn io_error(&self, action: &'static str, error: std::io::Error) -> Error {
        Error::io(action, &self.path, error)
    }

    fn begin(&mut self, restart: bool, gzip: bool, validator: Option<Validator>) -> Result<()> {
        if restart && self.written > 0 {
            self.out.flush().map_err(|e| self.io_error("writing", e))?;
            let file = self.out.get_mut();
            file.set_len(0).map_err(|e| Error::io("truncating", &self.path, e))?;
            file.seek(std::io::SeekFrom::Start(0))
                .map_err(|e| Error::io("seeking", &self.path, e))?;
            self.hasher
                .send(HashMessage::Reset)
                .map_err(|e| self.io_error("hashing", e))?;
            self.written = 0;
            self.last_checkpoint = 0;
            self.checker.resume_from(0, 0);
        }
        // A broken body already dropped its partial line; after an unframed end the partial
        // line stays, and this body continues it from the byte where that one stopped.
        if restart {
            self.checker.discard_partial();
        }
        self.validator = validator;
        self.gzip = gzip.then(|| flate2::write::GzDecoder::new(Vec::new()));
        Ok(())
    }

    fn content_error(&self, error: FeedError) -> Error {
        match error {
            FeedError::Line(line) => Error::Content {
                url: self.url.clone(),
                line: line.line,
                reason: line.reason,
            },
            FeedError::Sink(e) => self.io_error("writing", e),
        }
    }

    /// Runs the line checker with a sink that hashes, counts and writes what it passes on.
    fn check_and_write(
        &mut self,
        step: impl FnOnce(&mut LineChecker, &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> Result<(), FeedError>,
    ) -> Result<()> {
        let Writer {
            out,
            hasher,
            written,
            checker,
            ..
        } = self;
        let mut sink = |bytes: &[u8]| {
            hasher.update(bytes)?;
            *written += bytes.len() as u64;
            out.write_all(bytes)
        };
        let result = step(checker, &mut sink);
        result.map_err(|e| self.content_error(e))
    }

    /// Checks decoded bytes and writes the whole lines.
    fn take_decoded(&mut self, decoded: &[u8]) -> Result<()> {
        self.check_and_write(|checker, sink| checker.feed(decoded, sink))
    }

    fn data(&mut self, chunk: &[u8]) -> Result<()> {
        match self.gzip.take() {
            None => self.take_decoded(chunk)?,
            Some(mut decoder) => {
                // flate2 holds decoded bytes back until the next write; flush hands them over
                // now, so a cut loses as little as possible.
                let outcome = decoder.write_all(chunk).and_then(|()| decoder.flush());
                let decoded = std::mem::take(decoder.get_mut());
                self.gzip = Some(decoder);
                if let Err(e) = outcome {
                    return Err(Error::Content {
                        url: self.url.clone(),
                        line: self.checker.lines() + 1,
                        reason: format!("gzip stream is corrupt: {e}"),
                    });
                }
                self.take_decoded(&decoded)?;
            }
        }
        // Mid-file durability points matter only to someone who records them (a worker's
        // checkpoint store); without one, syncing here would only slow the download.
        if self.checkpoints.is_some() && self.written - self.last_checkpoint >= self.checkpoint_every {
            self.sync_checkpoint()?;
        }
        Ok(())
    }

    fn position(&self) -> Checkpoint {
        Checkpoint {
            offset: self.written,
            lines: self.checker.lines(),
            resources: self.checker.resources(),
            validator: self.validator.clone(),
        }
    }

    fn sync_checkpoint(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| self.io_error("writing", e))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| self.io_error("syncing", e))?;
        self.last_checkpoint = self.written;
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.send_replace(self.position());
        }
        Ok(())
    }

    fn end_of_body(&mut self, end: End) -> Result<Ended> {
        let mut cut = None;
        let finished = match end {
            End::Complete => {
                self.finish_gzip()?;
                self.check_and_write(|checker, sink| checker.finish(sink))?;
                true
            }
            // A gzip stream carries its own end (the trailer with CRC and length): if it is
            // there, the body is whole whatever the framing.
            End::Unframed if self.gzip.is_some() => match self.finish_gzip() {
                Ok(()) => {
                    self.check_and_write(|checker, sink| checker.finish(sink))?;
                    true
                }
                Err(error) => {
                    cut = Some(format!("the connection closed before the gzip stream ended ({error})"));
                    self.checker.discard_partial();
                    false
                }
            },
            // Identity without framing: keep the last (perhaps partial) line; the caller
            // confirms the end with a Range request from the byte after it.
            End::Unframed => false,
            End::Broken => {
                self.gzip = None;
                self.checker.discard_partial();
                false
            }
        };
        self.sync_checkpoint()?;
        Ok(Ended {
            checkpoint: self.position(),
            received: self.written + self.checker.pending_bytes() as u64,
            finished,
            cut,
        })
    }

    /// Decodes the rest of a gzip body and checks its trailer.
    fn finish_gzip(&mut self) -> Result<()> {
        if let Some(decoder) = self.gzip.take() {
            let decoded = decoder.finish().map_err(|e| Error::Content {
                url: self.url.clone(),
                line: self.checker.lines() + 1,
                reason: format!("gzip stream ended early or is corrupt: {e}"),
            })?;
            self.take_decoded(&decoded)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Stats> {
        self.sync_checkpoint()?;
        let sha256 = self.hasher.finish().map_err(|e| Error::io("hashing", &self.path, e))?;
        Ok(Stats {
            bytes: self.written,
            resources: self.checker.resources(),
            sha256,
            issues: self.checker.outcome_issues().to_vec(),
            ehr_errors: self.checker.outcome_errors(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ndjson::Expect;

    const ERROR: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"Patient/7 could not be exported"}]}"#;
    const INFO: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational","diagnostics":"done"}]}"#;

    #[test]
    #[allow(clippy::disallowed_methods)] // The test writes the partial file itself.
    fn a_resumed_error_file_counts_the_errors_before_its_checkpoint_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.ndjson.part");
        let kept = format!("{ERROR}\n{INFO}\n{ERROR}\n");
        std::fs::write(&path, &kept).unwrap();
        let resume = Checkpoint {
            offset: kept.len() as u64,
            lines: 3,
            resources: 3,
            validator: None,
        };
        let mut writer = Writer::open(
            path,
            &resume,
            LineChecker::new(Expect::OperationOutcome, 1 << 20),
            u64::MAX,
            None,
            SafeUrl::from("https://ehr.example/error.ndjson"),
            Offload::Inline,
        )
        .unwrap();
        writer.data(&Bytes::from(format!("{ERROR}\n"))).unwrap();
        let stats = writer.finish().unwrap();
        assert_eq!(stats.resources, 4);
        assert_eq!(stats.ehr_errors, 3, "two before the checkpoint, one after");
        assert_eq!(
            stats.issues.len(),
            4,
            "every OperationOutcome's words, the kept ones too"
        );
    }
}
