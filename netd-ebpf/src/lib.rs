// Exists so that netd can name this crate as a build-dependency: cargo then
// rebuilds netd when the eBPF sources change. The programs are in main.rs.
#![no_std]
