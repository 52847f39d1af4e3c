//! Runs inside the benchmark's containers (linked statically, bind-mounted
//! into the busybox image): TCP echo on port 7, discard on port 9. Each port
//! serves its connections one after another on one thread, as the benchmark's
//! client opens them (netperf's server works alike): a thread per connection
//! would cost more than the path to it that the benchmark measures.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

fn serve(port: u16, handle: fn(TcpStream, &mut [u8])) -> thread::JoinHandle<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        for stream in listener.incoming().flatten() {
            let _ = stream.set_nodelay(true);
            handle(stream, &mut buf);
        }
    })
}

fn echo(mut s: TcpStream, buf: &mut [u8]) {
    while let Ok(n) = s.read(buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn discard(mut s: TcpStream, buf: &mut [u8]) {
    while matches!(s.read(buf), Ok(n) if n > 0) {}
}

fn main() {
    let a = serve(7, echo);
    let b = serve(9, discard);
    let _ = a.join();
    let _ = b.join();
}
