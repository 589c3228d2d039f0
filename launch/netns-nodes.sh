#!/usr/bin/env bash
# Two "nodes" on one machine: Linux network namespaces cgd-node0 (10.200.0.1) and cgd-node1 (10.200.0.2), each
# attached by its interface cgd0 to the bridge cgd-br on the host side (10.200.0.254), so a multi-node launch can
# be tried without a second machine, and a service on the host (an object store) is outside both nodes:
#
#   sudo launch/netns-nodes.sh up
#   sudo ip netns exec cgd-node0 env GLOO_SOCKET_IFNAME=cgd0 <node 0 command with --main_process_ip 10.200.0.1>
#   sudo ip netns exec cgd-node1 env GLOO_SOCKET_IFNAME=cgd0 <node 1 command with --main_process_ip 10.200.0.1>
#   sudo launch/netns-nodes.sh down
#
# The namespaces share the file system (a shared run directory, as on a cluster; give each node its own directory
# to try node-local ones) but not the network: the nodes reach each other and the host only through 10.200.0.0/24.
# Gloo must be told the interface (GLOO_SOCKET_IFNAME), else it picks the host name's address and the rendezvous
# hangs.
set -euo pipefail

PREFIX=${NETNS_PREFIX:-cgd-node}
IFACE=cgd0
BRIDGE=cgd-br
SUBNET=10.200.0
HOST_IP=$SUBNET.254

die() { echo "netns-nodes: $*" >&2; exit 1; }

up() {
  [ "$(id -u)" -eq 0 ] || die "up needs root (it creates network namespaces)"
  command -v ip >/dev/null || die "the ip command (package iproute2) is missing"
  if ip netns list | grep -q "^${PREFIX}0\b"; then
    echo "netns-nodes: already up"
    return
  fi
  ip link add "$BRIDGE" type bridge
  ip addr add "$HOST_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for n in 0 1; do
    ip netns add "${PREFIX}$n"
    ip link add "cgd-h$n" type veth peer name "$IFACE" netns "${PREFIX}$n"
    ip link set "cgd-h$n" master "$BRIDGE" up
    ip -n "${PREFIX}$n" addr add "$SUBNET.$((n + 1))/24" dev "$IFACE"
    ip -n "${PREFIX}$n" link set "$IFACE" up
    ip -n "${PREFIX}$n" link set lo up
  done
  echo "netns-nodes: ${PREFIX}0=$SUBNET.1 ${PREFIX}1=$SUBNET.2 (interface $IFACE in both), host $HOST_IP on $BRIDGE"
}

down() {
  for n in 0 1; do
    ip netns pids "${PREFIX}$n" 2>/dev/null | xargs -r kill -9
    ip netns del "${PREFIX}$n" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  echo "netns-nodes: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down" ;;
esac
