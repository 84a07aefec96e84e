# Locate the installed PyTorch by asking its own Python for paths, instead of
# find_package(Torch): torch's CMake config drags in find_package(CUDAToolkit)
# and expects cuBLAS/cuDNN/NVRTC headers next to nvcc, which a minimal toolkit
# (cudart + headers) does not have. We only need torch's headers and libraries.
#
# Defines the imported target qwen3x::torch and these variables:
#   QWEN3X_TORCH_VERSION        e.g. 2.14.1+cu130
#   QWEN3X_TORCH_CUDA_VERSION   e.g. 13.0 (empty for a CPU-only torch)
#   QWEN3X_TORCH_CXX11_ABI      0 or 1 (value of _GLIBCXX_USE_CXX11_ABI)
#   QWEN3X_TORCH_LIBRARY_DIR    directory holding libtorch*.so / libc10*.so

function(qwen3x_find_torch)
  if(NOT Python_EXECUTABLE)
    message(FATAL_ERROR "qwen3x: Python_EXECUTABLE must be known before qwen3x_find_torch()")
  endif()

  set(_probe [=[
import torch, torch.utils.cpp_extension as ce
def plain(paths):
    return ";".join(p for p in paths if p)
print("VERSION=" + torch.__version__)
print("CUDA=" + (torch.version.cuda or ""))
print("ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("INCLUDES=" + plain(ce.include_paths()))
print("LIBDIRS=" + plain(ce.library_paths()))
]=])
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${_probe}"
    OUTPUT_VARIABLE _out
    ERROR_VARIABLE _err
    RESULT_VARIABLE _rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "qwen3x: could not import torch with ${Python_EXECUTABLE}:\n${_err}")
  endif()

  # One "KEY=value" line per item; the path lists are already ';'-joined.
  foreach(_key VERSION CUDA ABI INCLUDES LIBDIRS)
    string(REGEX MATCH "(^|\n)${_key}=([^\n]*)" _m "${_out}")
    set(_torch_${_key} "${CMAKE_MATCH_2}")
  endforeach()

  # The first library path is torch/lib; the others (e.g. /usr/local/lib) are
  # generic fallbacks that cpp_extension appends.
  list(GET _torch_LIBDIRS 0 _torch_libdir)

  set(_libs)
  foreach(_name c10 torch torch_cpu torch_cuda c10_cuda)
    find_library(_lib_${_name} NAMES ${_name} PATHS "${_torch_libdir}" NO_DEFAULT_PATH)
    if(NOT _lib_${_name})
      message(FATAL_ERROR "qwen3x: lib${_name}.so not found in ${_torch_libdir} "
                          "(is this a CUDA build of torch?)")
    endif()
    list(APPEND _libs "${_lib_${_name}}")
  endforeach()

  add_library(qwen3x_torch INTERFACE)
  add_library(qwen3x::torch ALIAS qwen3x_torch)
  target_include_directories(qwen3x_torch SYSTEM INTERFACE ${_torch_INCLUDES})
  target_link_libraries(qwen3x_torch INTERFACE ${_libs})
  target_compile_definitions(qwen3x_torch INTERFACE
    _GLIBCXX_USE_CXX11_ABI=${_torch_ABI}
    # Keep CUDA's half/bf16 implicit operators and conversions out of the way
    # of c10::Half / c10::BFloat16 (as torch's own extensions do); kernels use
    # explicit intrinsics (__bfloat162float, __float2bfloat16_rn, ...).
    __CUDA_NO_HALF_OPERATORS__
    __CUDA_NO_HALF_CONVERSIONS__
    __CUDA_NO_HALF2_OPERATORS__
    __CUDA_NO_BFLOAT16_CONVERSIONS__)

  set(QWEN3X_TORCH_VERSION "${_torch_VERSION}" PARENT_SCOPE)
  set(QWEN3X_TORCH_CUDA_VERSION "${_torch_CUDA}" PARENT_SCOPE)
  set(QWEN3X_TORCH_CXX11_ABI "${_torch_ABI}" PARENT_SCOPE)
  set(QWEN3X_TORCH_LIBRARY_DIR "${_torch_libdir}" PARENT_SCOPE)
  message(STATUS "qwen3x: torch ${_torch_VERSION} (CUDA ${_torch_CUDA}, "
                 "CXX11 ABI ${_torch_ABI}) from ${_torch_libdir}")
endfunction()
