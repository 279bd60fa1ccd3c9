//! A TCP proxy that adds latency each way, and that can be cut: it stands in for the distance
//! between regions, and between a client and each region, in the benchmark and the tests (one
//! machine has no distance), and for a link or a server that goes away.
//!
//! Every chunk read is written on after the delay, without waiting for the chunks before it to be
//! answered, so the link delays but does not throttle. The delay can be changed while it runs (a
//! region that turns slow); with none, chunks pass at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub struct DelayProxy {
    pub addr: SocketAddr,
    target: String,
    delay_us: Arc<AtomicU64>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl DelayProxy {
    /// Listen on a free local port and forward to `target` (`host:port`) with `one_way` delay
    /// in each direction.
    pub async fn start(target: &str, one_way: Duration) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let delay_us = Arc::new(AtomicU64::new(one_way.as_micros() as u64));
        let connections = Arc::default();
        let acceptor = accept(
            listener,
            target.to_owned(),
            delay_us.clone(),
            Arc::clone(&connections),
        );
        Ok(DelayProxy {
            addr,
            target: target.to_owned(),
            delay_us,
            connections,
            acceptor,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Change the one-way delay of every connection, from the next chunk on.
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us
            .store(one_way.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cut the link: every connection through it drops and new ones are refused.
    pub fn cut(&self) {
        self.acceptor.abort();
        for connection in self.connections.lock().expect("proxy lock").drain(..) {
            connection.abort();
        }
    }

    /// Mend a cut link: accept on the same address again.
    pub async fn resume(&mut self) -> std::io::Result<()> {
        // The aborted acceptor's listener closes asynchronously: the port frees within moments.
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) if attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
        };
        self.acceptor = accept(
            listener,
            self.target.clone(),
            self.delay_us.clone(),
            Arc::clone(&self.connections),
        );
        Ok(())
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn accept(
    listener: TcpListener,
    target: String,
    delay_us: Arc<AtomicU64>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let (target, delay_us) = (target.clone(), delay_us.clone());
            let connection = tokio::spawn(async move {
                if let Ok(outbound) = TcpStream::connect(&target).await {
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        relay(in_read, out_write, delay_us.clone()),
                        relay(out_read, in_write, delay_us),
                    );
                }
            });
            let mut open = connections.lock().expect("proxy lock");
            open.retain(|c| !c.is_finished());
            open.push(connection);
        }
    })
}

/// Copy `from` to `to`, each chunk after the delay from when it was read.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_us: Arc<AtomicU64>,
) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = receiver.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
                    if sender.send((due, buffer[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
