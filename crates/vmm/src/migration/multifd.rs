//! multifd: page channels, each a thread with its own connection that
//! reads, zero-checks and sends its shards of every pass. The main thread
//! only hands out passes and syncs the dirty log once every channel has
//! sent its share of the last one.

use std::io::Write;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use devices::GuestMemory;

use super::sender::{PageSender, Progress, Work};
use super::source::SourceError;
use super::stream::{SectionKind, StreamWriter};
use super::transport::Interrupt;

/// One page connection: its stream (setup section written) and what
/// breaks a write blocked on it.
pub(super) struct Connection {
    pub(super) stream: StreamWriter<Box<dyn Write + Send>>,
    pub(super) interrupt: Option<Interrupt>,
}

struct Channel<'scope> {
    /// The channel's number in the stream (1..=n).
    number: u8,
    work: SyncSender<Work>,
    interrupt: Option<Interrupt>,
    thread: ScopedJoinHandle<'scope, Result<(), SourceError>>,
}

/// A channel's answer to a pass: its number and how the pass went.
type Done = (u8, Result<(), SourceError>);

/// The running channel threads.
pub(super) struct Channels<'scope> {
    channels: Vec<Channel<'scope>>,
    done: Receiver<Done>,
}

fn failed(channel: u8, e: SourceError) -> SourceError {
    match e {
        SourceError::Cancelled | SourceError::Multifd { .. } => e,
        e => SourceError::Multifd {
            channel: channel.into(),
            problem: e.to_string(),
        },
    }
}

/// A channel thread: sends its share of each pass, then the end of its
/// stream once the main thread hangs up. A failed pass is reported on
/// `done` and ends the thread.
fn serve(
    mut sender: PageSender<Box<dyn Write + Send>>,
    number: u8,
    memory: GuestMemory,
    progress: &Progress,
    work: Receiver<Work>,
    done: Sender<Done>,
) -> Result<(), SourceError> {
    for pass in work {
        let result = sender.run(&memory, &pass, progress, 0);
        let ok = result.is_ok();
        // The main thread waits for every channel's answer; it is gone only
        // once it gave up on the migration.
        let _ = done.send((number, result));
        if !ok {
            return Ok(());
        }
    }
    let mut stream = sender.into_stream();
    stream.section(SectionKind::End, &[])?;
    stream.flush()?;
    Ok(())
}

impl<'scope> Channels<'scope> {
    /// Starts one thread per connection.
    pub(super) fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        connections: Vec<Connection>,
        memory: &GuestMemory,
        progress: &'env Progress<'env>,
    ) -> Result<Self, SourceError> {
        let (done_tx, done) = channel();
        let of = connections.len() as u64;
        let mut channels = Vec::with_capacity(connections.len());
        for (index, conn) in connections.into_iter().enumerate() {
            let number = index as u8 + 1;
            let (work, rx) = sync_channel(1);
            let sender = PageSender::new(conn.stream, index as u64, of, None);
            let (memory, done_tx) = (memory.clone(), done_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("multifd-{number}"))
                .spawn_scoped(scope, move || {
                    serve(sender, number, memory, progress, rx, done_tx)
                })
                .map_err(|e| SourceError::Multifd {
                    channel: number.into(),
                    problem: format!("starting its thread: {e}"),
                })?;
            channels.push(Channel {
                number,
                work,
                interrupt: conn.interrupt,
                thread,
            });
        }
        Ok(Channels { channels, done })
    }

    /// Sends one pass on every channel; returns once all have sent their share.
    pub(super) fn pass(&mut self, work: Work) -> Result<(), SourceError> {
        for c in &self.channels {
            if c.work.send(work.clone()).is_err() {
                return Err(self.first_failure().unwrap_or(SourceError::Multifd {
                    channel: c.number.into(),
                    problem: "its thread stopped".into(),
                }));
            }
        }
        for _ in &self.channels {
            match self.done.recv() {
                Ok((_, Ok(()))) => {}
                Ok((number, Err(e))) => return Err(failed(number, e)),
                Err(_) => {
                    return Err(SourceError::Multifd {
                        channel: 0,
                        problem: "every channel thread stopped".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The error a channel reported, if one did.
    fn first_failure(&self) -> Option<SourceError> {
        self.done
            .try_iter()
            .find_map(|(number, r)| r.err().map(|e| failed(number, e)))
    }

    /// Ends every channel's stream and waits for the threads.
    pub(super) fn finish(self) -> Result<(), SourceError> {
        let mut result = Ok(());
        for c in self.channels {
            drop(c.work);
            let outcome = c.thread.join().unwrap_or_else(|_| {
                Err(SourceError::Multifd {
                    channel: c.number.into(),
                    problem: "its thread panicked".into(),
                })
            });
            if let (Err(e), Ok(())) = (outcome, &result) {
                result = Err(failed(c.number, e));
            }
        }
        result
    }

    /// Gives up: breaks every connection and waits for the threads.
    pub(super) fn stop(self) {
        for c in &self.channels {
            if let Some(i) = &c.interrupt {
                i.interrupt();
            }
        }
        for c in self.channels {
            drop(c.work);
            let _ = c.thread.join();
        }
    }
}
