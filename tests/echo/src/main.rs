//! Runs inside the benchmark's containers (linked statically, bind-mounted
//! into the busybox image): TCP echo on port 7, discard on port 9, one
//! thread per connection. Small on purpose: the benchmark measures the path
//! to it, not it.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

fn serve(port: u16, handle: fn(TcpStream)) -> thread::JoinHandle<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_nodelay(true);
            thread::spawn(move || handle(stream));
        }
    })
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn discard(mut s: TcpStream) {
    let mut buf = [0u8; 65536];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

fn main() {
    let a = serve(7, echo);
    let b = serve(9, discard);
    let _ = a.join();
    let _ = b.join();
}
