"""experiments.gpu_decode_profile's kernel grouping (the profile itself runs on a GPU)."""

from experiments.gpu_decode_profile import kind_of, step_timeline


def test_decode_profile_sorts_kernels_by_kind():
    assert kind_of("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT") == "gemm"
    assert kind_of("void cublasLt::splitKreduce_kernel<32, 16, int>") == "gemm"
    assert kind_of("_decode_reduce_kernel") == "attention"
    assert kind_of("_gemv_kernel") == "gemm"
    assert kind_of("_gemv_qkv_rope_kernel") == "gemm"  # the fused projection + rotary + store
    assert kind_of("_rotary_kernel") == "rotary"
    assert kind_of("_slice_max_kernel") == kind_of("_pick_slice_kernel") == "argmax"
    assert kind_of("void at::native::reduce_kernel<512, 1, ReduceOp<float, ArgMaxOps<f>>>") == (
        "argmax"
    )
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, copy>") == "other"


def test_step_timeline_measures_each_step_from_one_graph_start_to_the_next():
    """Three steps of 100, 110 and 130 us; kernels overlap (PDL) and copies sit between."""
    events = []
    for start, idle in ((0.0, 10.0), (100.0, 20.0), (210.0, 40.0)):
        events += [
            ("_stage_inputs_kernel", start, start + 5),
            ("_gemv_kernel", start + 5, start + 60),
            ("_decode_split_kernel", start + 50, start + 90),  # overlaps the GEMV's tail
            ("Memcpy HtoD (Pinned -> Device)", start + 90 + idle / 2, start + 90 + idle / 2),
        ]
    events.append(("_stage_inputs_kernel", 340.0, 345.0))
    timeline = step_timeline(events)
    assert timeline["steps"] == 3
    assert timeline["period_us_median"] == 110.0  # the middle step
    assert timeline["idle_us_in_median_step"] == 20.0
    assert timeline["ops_in_median_step"] == 4
    assert step_timeline([("_gemv_kernel", 0.0, 1.0)]) == {"steps": 0}


def test_host_step_reports_the_time_per_decode_step():
    """Runs here on the CPU (where the tiny model's own compute is in the figure too)."""
    from experiments.gpu_decode_profile import host_step

    result = host_step(requests=3, new_tokens=4, device="cpu")
    assert result["requests"] == 3 and result["new_tokens"] == 4
    assert 0 < result["first_token_seconds"] < result["whole_seconds"]
    assert result["ms_per_decode_step"] > 0
