"""ser2net compatibility: read ser2net.yaml(5), convert it to muxd's config,
and take ser2net's command line (muxd.ser2net.mode), so that a lab, labgrid's
exporter included, switches from ser2net to muxd without rewriting anything.

reader.py   ser2net.yaml as ser2net reads it (duplicate keys, anchors, defines)
convert.py  connections -> muxd ports (one per device), with comments and errors
options.py  a connection's options -> listener keys and trace files
render.py   the converted ports as a commented muxd YAML file
mode.py     `muxd convert ser2net`, `muxd run --ser2net`, and muxd started as `ser2net`
"""
