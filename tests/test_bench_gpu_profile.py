"""bench.gpu_decode_profile's kernel grouping (the profile itself runs on a GPU)."""

from bench.gpu_decode_profile import kind_of


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
