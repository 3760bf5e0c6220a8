"""SHARDCAST: signed, sharded checkpoint broadcast (origin -> relays -> clients) over HTTP.

The Python API the node and the coordinator use (import from the submodules: the package
itself imports nothing, so `shardcast fetch` starts without loading the web server stack):

    from shardcast.origin import Origin
    from shardcast.relay import Relay
    from shardcast.client import Client, FetchResult
    from shardcast.fetcher import FetchPolicy
    from shardcast.errors import ShardcastError, ManifestError, FetchError, DeltaError

    Origin(root, identity, pool_id, keep=4, shard_size=16 MiB, full_every=10, rate=None)
        await origin.serve(host, port)              (nursery.start: gives the URL)
        await origin.publish(folder, version, delta=True, requires=None) -> Manifest
        origin.publish_from_thread(folder, version, delta=True, requires=None) -> Manifest
    Relay(upstreams, root, public_key=, pool_id=, keep=4, rate=None)
        await relay.run(host, port)                 (nursery.start: gives the URL)
    Client(sources, dest, public_key=, pool_id=, keep=3)
        await client.fetch(version | "latest") -> FetchResult
        await client.wait_for_newer(after, timeout) -> int | None
        client.local_versions(), client.path_of(version)

Everything is trio; blocking work (hashing, copying, delta coding) runs in worker threads.
"""
