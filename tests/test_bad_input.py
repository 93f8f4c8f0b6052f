"""Bad parameters raise errors naming the parameter, the value and what is allowed."""

import math

import numpy as np
import pytest

import wildenberg_intake

BOX = [1001, 3007, 805, 2503, 301, 699]

# (parameters, error type, message pattern, raised when: "open" = building the source, "plan" = discover)
CASES = [
    (dict(bbox_nm=[1, 2, 3]), ValueError, r"bbox_nm=\[1, 2, 3\].*six numbers", "open"),
    (dict(bbox_nm=[3007, 1001, 805, 2503, 301, 699]), ValueError, r"bbox_nm=.*inverted along x", "open"),
    (dict(bbox_nm=[1001, 3007, 805, 805, 301, 699]), ValueError, r"bbox_nm=.*empty or inverted along y", "open"),
    (dict(bbox_nm=[1001, 3007, 805, 2503, math.nan, 699]), ValueError, r"bbox_nm=\[1001(\.0)?, 3007(\.0)?, 805(\.0)?, 2503(\.0)?, nan, 699(\.0)?\] is not valid: nan is not a finite number", "open"),
    (dict(bbox_nm=[1001, math.inf, 805, 2503, 301, 699]), ValueError, r"bbox_nm=\[1001(\.0)?, inf, 805(\.0)?, 2503(\.0)?, 301(\.0)?, 699(\.0)?\] is not valid: inf is not a finite number", "open"),
    (dict(bbox_nm=["a", 3007, 805, 2503, 301, 699]), ValueError, r"bbox_nm=\['a', 3007, 805, 2503, 301, 699\] is not valid: 'a' is not a finite number", "open"),
    (dict(bbox_nm="abc"), ValueError, r"bbox_nm='abc'.*six numbers", "open"),
    (dict(bbox_nm=np.array([1e9, 1e9 + 500, 805, 2503, 301, 699])), ValueError,
     r"bbox_nm=.*lies outside the volume", "plan"),
    (dict(em_mip=7), ValueError, r"em_mip=7 does not exist.*allowed: \[0, 1, 2\]", "plan"),
    (dict(seg_mip=1), ValueError, r"seg_mip=1 does not exist.*allowed: \[0\]", "plan"),
    (dict(em_mip=-1), ValueError, r"em_mip=-1.*non-negative integer", "open"),
    (dict(em_mip="one"), ValueError, r"em_mip='one'.*non-negative integer", "open"),
    (dict(em_mip=1.5), ValueError, r"em_mip=1.5.*non-negative integer", "open"),
    (dict(raw_codec="gzip"), ValueError, r"raw_codec='gzip' is not supported; allowed: \['zstd1'", "open"),
    (dict(base_url="ftp://example.org/wildenberg2023"), ValueError, r"base_url=.*unsupported scheme 'ftp'", "open"),
]


@pytest.mark.parametrize("params,error,pattern,when", CASES, ids=[str(c[0])[:40] for c in CASES])
def test_bad_parameters(params, error, pattern, when, catalog, server, tmp_path):
    kwargs = dict(bbox_nm=BOX, base_url=server.base_url, cache_dir=str(tmp_path))
    kwargs.update(params)
    if when == "open":
        with pytest.raises(error, match=pattern):
            catalog.p105_psd(**kwargs)
    else:
        src = catalog.p105_psd(**kwargs)
        with pytest.raises(error, match=pattern):
            src.discover()
        with pytest.raises(error, match=pattern):
            src.read()
    assert not (tmp_path / "wildenberg2023").exists(), "a refused request writes nothing"


def test_cache_dir_that_is_a_file(catalog, server, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"cache_dir=.*a-file.* is a file; allowed: a folder"):
        catalog.p14_psd(bbox_nm=BOX, base_url=server.base_url, cache_dir=str(f))


def test_unknown_entry_names_the_allowed_ones(server, tmp_path):
    cat = wildenberg_intake.open_catalog(base_url=server.base_url, cache_dir=str(tmp_path))
    with pytest.raises(AttributeError, match=r"entry 'p999_psd' is unknown; allowed: \['p105_psd'"):
        cat.p999_psd()
    with pytest.raises(KeyError, match=r"entry 'p14_synapse' is unknown; allowed: .*'p14_synapses'"):
        cat["p14_synapse"]


def test_unreachable_base_url_names_the_layer(catalog, tmp_path):
    src = catalog.p14_psd(base_url="http://127.0.0.1:9/nothing", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"layer precomputed://http://127.0.0.1:9/nothing/mouse_v1_l4_p14/em_aligned"):
        src.discover()


@pytest.mark.parametrize("params,pattern", [
    (dict(workers=0), r"workers=0 is not valid; allowed: a positive integer$"),
    (dict(workers=True), r"workers=True is not valid"),
    (dict(workers=2.5), r"workers=2.5 is not valid"),
    (dict(connections=None), r"connections=None is not valid; allowed: a positive integer$"),
    (dict(connections=-3), r"connections=-3 is not valid"),
])
def test_bad_workers_and_connections(params, pattern, catalog, server, tmp_path):
    with pytest.raises(ValueError, match=pattern):  # refused when the source is made, whatever it is used for
        catalog.p105_psd(bbox_nm=BOX, base_url=server.base_url, cache_dir=str(tmp_path), progress=False, **params)
    src = catalog.p105_psd(bbox_nm=BOX, base_url=server.base_url, cache_dir=str(tmp_path), progress=False)
    from wildenberg_intake.store.engine import materialise
    with pytest.raises(ValueError, match=pattern):  # and by the engine, for code that calls it directly
        materialise(src.plan, **params)
    assert not (tmp_path / "wildenberg2023").exists(), "a refused request writes nothing"



@pytest.mark.parametrize("kwargs,message", [
    (dict(bbox=[576, 6000, 576, 6000, 160, 800]), r"parameter 'bbox' is unknown; allowed: \[.*'bbox_nm'.*\]; did you mean 'bbox_nm'\?$"),
    (dict(emmip=0), r"parameter 'emmip' is unknown; .*did you mean 'em_mip'\?$"),
    (dict(seg_mipp=0), r"parameter 'seg_mipp' is unknown; .*did you mean 'seg_mip'\?$"),
    (dict(cachedir="/tmp"), r"parameter 'cachedir' is unknown; .*did you mean 'cache_dir'\?$"),
    (dict(worker=2), r"parameter 'worker' is unknown; .*did you mean 'workers'\?$"),
    (dict(cache_limt="1GB"), r"parameter 'cache_limt' is unknown; .*did you mean 'cache_limit'\?$"),
    (dict(zzz=1), r"parameter 'zzz' is unknown; allowed: \[[^]]*\]$"),
])
def test_a_misspelled_parameter_is_refused_with_the_closest_name(kwargs, message, catalog, tmp_path):
    with pytest.raises(ValueError, match=message):
        catalog.p105_psd(cache_dir=str(tmp_path), **kwargs)
    import wildenberg_intake
    with pytest.raises(ValueError, match=message):
        wildenberg_intake.open_catalog(cache_dir=str(tmp_path)).p105_psd(**kwargs)
    if "worker" not in kwargs:
        with pytest.raises(ValueError, match=message):
            catalog.p14_synapses(cache_dir=str(tmp_path), **kwargs)


def test_an_unknown_entry_is_named_in_python_as_in_the_cli():
    import wildenberg_intake
    cat = wildenberg_intake.open_catalog()
    with pytest.raises(AttributeError, match=r"entry 'p105_pds' is unknown; allowed: \[.*\]; did you mean 'p105_psd'\?"):
        cat.p105_pds
    with pytest.raises(KeyError, match=r"entry 'p14_vesicle' is unknown; .*did you mean 'p14_vesicle_cloud'\?"):
        cat["p14_vesicle"]
    assert "p105_psd" in cat and cat.p105_psd.describe()["name"] == "p105_psd"
    assert sorted(cat) == sorted(wildenberg_intake.entry_names())


@pytest.mark.parametrize("argv,python,message", [
    (["fetch", "p14_psd", "--workers", "0"], ("p14_psd", dict(workers=0)), "workers=0 is not valid; allowed: a positive integer"),
    (["synapses", "p14", "--workers", "0"], ("p14_synapses", dict(workers=0)), "workers=0 is not valid; allowed: a positive integer"),
    (["synapses", "p14", "--block-shape", "0", "5", "5"], ("p14_synapses", dict(block_shape=[0, 5, 5])),
     "block_shape=[0, 5, 5] is not valid; allowed: three positive voxel counts (z, y, x)"),
])
def test_the_cli_and_python_refuse_a_bad_value_with_one_message(argv, python, message, catalog, capsys, tmp_path):
    """One validation serves both: the same line, before any request (the base URL answers nothing)."""
    from wildenberg_intake import cli
    base = ["--base-url", "http://127.0.0.1:9/nothing", "--cache-dir", str(tmp_path)]
    assert cli.main(argv + base) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
    entry, kwargs = python
    with pytest.raises(ValueError) as info:
        getattr(catalog, entry)(base_url="http://127.0.0.1:9/nothing", cache_dir=str(tmp_path), **kwargs)
    assert str(info.value) == message
    assert not (tmp_path / "wildenberg2023").exists()


@pytest.mark.torch
def test_unknown_keywords_are_refused_with_the_closest_before_any_request_or_file(server, tmp_path):
    """get_dataset, get_loader, open_catalog, an entry's methods (materialise, to_dask, read, table)
    and the preview's render name an unknown keyword, the allowed ones and the closest, before a
    request is sent or a file written (torch-em would raise after the fetch)."""
    import wildenberg_intake
    from wildenberg_intake import get_dataset, get_loader
    from wildenberg_intake.viewer.preview import render
    cache = tmp_path / "cache"
    common = dict(base_url=server.base_url, cache_dir=str(cache), progress=False)
    before = server.requests
    cases = [(lambda: get_dataset(["p14_psd"], (8, 64, 64), bbox_mn=[0, 1, 0, 1, 0, 1], **common),
              r"get_dataset keyword 'bbox_mn' is unknown; allowed: \[.*'bbox_nm'.*\]; did you mean 'bbox_nm'\?"),
             (lambda: get_loader(["p14_psd"], (8, 64, 64), batch_size=1, num_worker=2, **common),
              r"get_loader keyword 'num_worker' is unknown; allowed: .*; did you mean 'num_workers'\?"),
             (lambda: get_dataset(["p14_psd"], (8, 64, 64), min_forground=0.01, **common),
              r"did you mean 'min_foreground'\?"),
             (lambda: wildenberg_intake.open_catalog(base_ur=server.base_url),
              r"open_catalog parameter 'base_ur' is unknown; allowed: .*; did you mean 'base_url'\?"),
             (lambda: wildenberg_intake.open_catalog(**common).p14_psd.materialise(clinet=None),
              r"^WildenbergSource.materialise\(\) keyword 'clinet' is unknown; allowed: \['client'\]; "
              r"did you mean 'client'\?$"),
             (lambda: wildenberg_intake.open_catalog(**common).p14_psd.to_dask(bbox_nm=[0, 1, 0, 1, 0, 1]),
              r"^WildenbergSource.to_dask\(\) takes no keywords; got 'bbox_nm'$"),
             (lambda: wildenberg_intake.open_catalog(**common).p14_psd.read(lazy=True),
              r"^WildenbergSource.read\(\) takes no keywords; got 'lazy'$"),
             (lambda: wildenberg_intake.open_catalog(**common).p14_synapses.table(clients=None),
              r"did you mean 'client'\?$"),
             (lambda: render(wildenberg_intake.open_catalog(**common).p14_psd, 0, str(tmp_path / "p.png"), maxsize=9),
              r"^render\(\) keyword 'maxsize' is unknown; allowed: \[.*\]; did you mean 'max_size'\?$")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError):  # as Python's own refusal of an unknown keyword
        wildenberg_intake.open_catalog(**common).p14_psd.materialise(pyramid=False)
    assert server.requests == before, "nothing may be requested before the keywords are checked"
    assert not (tmp_path / "p.png").exists()
    assert not cache.exists(), "nothing may be written before the keywords are checked"
    # entry options reach the entries (they went to torch-em before)
    ds = get_dataset(["p14_psd"], (8, 64, 64), raw_codec="zstd3", retry={"attempts": 2}, **common)
    assert len(ds) > 0
    with pytest.raises(ValueError, match=r"sources: p14_synapses is a synapse table, not a label volume; allowed: "
                                         r"the label entries, e.g. \['p14_psd', 'p14_vesicle_cloud', 'p14_saturated'\]"):
        get_dataset(["p14_synapses"], (8, 64, 64), **common)


def test_intakes_own_catalog_names_a_misspelled_entry_and_the_closest():
    import intake
    cat = intake.cat.wildenberg2023
    with pytest.raises(AttributeError, match=r"entry 'p105_psds' is unknown; allowed: \[.*\]; did you mean 'p105_psd'\?"):
        cat.p105_psds
    with pytest.raises(KeyError, match=r"entry 'p14_vesicle' is unknown; .*did you mean 'p14_vesicle_cloud'\?"):
        cat["p14_vesicle"]
    assert cat.p105_psd.request.label == "psd"
