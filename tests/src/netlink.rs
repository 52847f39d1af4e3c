//! Link, address and route setup inside a namespace, over rtnetlink.
use std::{future::Future, net::Ipv4Addr, os::fd::AsRawFd as _};

use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use rtnetlink::Handle;

use crate::netns::NetNs;

/// Runs `f` with an rtnetlink handle whose socket lives in `ns`.
pub fn with_netlink<T, F, Fut>(ns: &NetNs, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().context("rtnetlink socket")?;
            tokio::spawn(conn);
            f(handle).await
        })
    })
}

pub async fn index(handle: &Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up {name}"))?
        .ok_or_else(|| anyhow!("no link {name}"))?;
    Ok(link.header.index)
}

pub async fn set_up(handle: &Handle, name: &str) -> Result<()> {
    let idx = index(handle, name).await?;
    handle.link().set(idx).up().execute().await?;
    Ok(())
}

pub async fn add_address(handle: &Handle, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    let idx = index(handle, name).await?;
    handle
        .address()
        .add(idx, addr.into(), prefix)
        .execute()
        .await
        .with_context(|| format!("adding {addr}/{prefix} to {name}"))
}

pub async fn add_route(
    handle: &Handle,
    dest: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<()> {
    handle
        .route()
        .add()
        .v4()
        .destination_prefix(dest, prefix)
        .gateway(gateway)
        .execute()
        .await
        .with_context(|| format!("adding route {dest}/{prefix} via {gateway}"))
}

/// Creates a veth pair in `here`, moves `peer` into `there` renamed to
/// `peer_new_name`, and brings both ends up.
pub fn veth_between(
    here: &NetNs,
    name: &str,
    there: &NetNs,
    peer: &str,
    peer_new_name: &str,
) -> Result<()> {
    let there_fd = std::fs::File::open(there.path())?;
    let raw = there_fd.as_raw_fd();
    with_netlink(here, |h| async move {
        h.link()
            .add()
            .veth(name.to_owned(), peer.to_owned())
            .execute()
            .await
            .with_context(|| format!("creating veth {name}/{peer}"))?;
        let peer_idx = index(&h, peer).await?;
        h.link()
            .set(peer_idx)
            .setns_by_fd(raw)
            .execute()
            .await
            .context("moving veth peer")?;
        set_up(&h, name).await
    })?;
    with_netlink(there, |h| async move {
        let idx = index(&h, peer).await?;
        h.link()
            .set(idx)
            .name(peer_new_name.to_owned())
            .execute()
            .await?;
        h.link().set(idx).up().execute().await?;
        Ok(())
    })
}

pub fn add_bridge(ns: &NetNs, name: &str) -> Result<()> {
    with_netlink(ns, |h| async move {
        h.link().add().bridge(name.to_owned()).execute().await?;
        set_up(&h, name).await
    })
}

pub fn enslave(ns: &NetNs, port: &str, bridge: &str) -> Result<()> {
    with_netlink(ns, |h| async move {
        let br = index(&h, bridge).await?;
        let idx = index(&h, port).await?;
        h.link().set(idx).controller(br).execute().await?;
        Ok(())
    })
}
