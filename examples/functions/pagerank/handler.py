"""pagerank: networkx PageRank on a deterministic Barabasi-Albert graph of 2000 nodes
(graph generated and ranked on every call). Answer: top 3 "node:rank" (rank rounded to 6)."""
import networkx as nx

try:
    # networkx's own power iteration in pure Python: nx.pagerank() in networkx >= 2.6 needs
    # scipy, which the image deliberately does not carry (python3-networkx only recommends it).
    from networkx.algorithms.link_analysis.pagerank_alg import _pagerank_python as pagerank
except ImportError:
    pagerank = nx.pagerank

NAME = "pagerank"
NODES = 2000


def run():
    graph = nx.barabasi_albert_graph(NODES, 3, seed=2000)
    ranks = pagerank(graph, alpha=0.85, tol=1e-10, max_iter=200)
    top = sorted(ranks.items(), key=lambda kv: (-round(kv[1], 6), kv[0]))[:3]
    return " ".join("%d:%.6f" % (node, rank) for node, rank in top)


if __name__ == "__main__":
    print(run())
