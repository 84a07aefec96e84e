# Turn a user-facing architecture list into nvcc -gencode flags.
#
# Accepted spellings (';' or ',' separated, whitespace ignored):
#   9.0a   90a   sm_90a      -> -gencode=arch=compute_90a,code=sm_90a
#   8.0    80    sm_80       -> -gencode=arch=compute_80,code=sm_80
#   9.0+PTX                  -> also embed compute_90 PTX (JIT on newer GPUs)
#
# The explicit -gencode form is used on purpose: with nvcc 13.0 the
# -arch=sm_90a shorthand also runs a plain sm_90 pass, which rejects
# arch-specific instructions (wgmma, setmaxnreg) that later kernels will use.
#
# qwen3x_cuda_gencode(<arch list> <out flags var> <out names var>)
#   <out names var> receives e.g. "sm_80;sm_90a" (PTX entries as "compute_90").

function(qwen3x_cuda_gencode arch_list out_flags out_names)
  string(REPLACE "," ";" _archs "${arch_list}")
  set(_flags)
  set(_names)
  foreach(_arch IN LISTS _archs)
    string(STRIP "${_arch}" _arch)
    if(_arch STREQUAL "")
      continue()
    endif()
    set(_ptx OFF)
    if(_arch MATCHES "^(.*)\\+[Pp][Tt][Xx]$")
      set(_ptx ON)
      set(_arch "${CMAKE_MATCH_1}")
    endif()
    string(REGEX REPLACE "^(sm_|compute_)" "" _arch "${_arch}")
    if(_arch MATCHES "^([0-9]+)\\.([0-9])([af]?)$")
      set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    elseif(_arch MATCHES "^([0-9]+)([af]?)$")
      set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
    else()
      message(FATAL_ERROR "qwen3x: cannot parse CUDA architecture '${_arch}' "
                          "(expected e.g. 9.0a, 8.0, 90a or 9.0+PTX)")
    endif()
    list(APPEND _flags "-gencode=arch=compute_${_num},code=sm_${_num}")
    list(APPEND _names "sm_${_num}")
    if(_ptx)
      list(APPEND _flags "-gencode=arch=compute_${_num},code=compute_${_num}")
      list(APPEND _names "compute_${_num}")
    endif()
  endforeach()
  if(NOT _flags)
    message(FATAL_ERROR "qwen3x: empty CUDA architecture list '${arch_list}'")
  endif()
  list(REMOVE_DUPLICATES _flags)
  list(REMOVE_DUPLICATES _names)
  set(${out_flags} "${_flags}" PARENT_SCOPE)
  set(${out_names} "${_names}" PARENT_SCOPE)
endfunction()
