# CUDA compiler / toolkit discovery and CUDA compile flags.
#
# include(SaleCuda) BEFORE project(): chooses CMAKE_CUDA_COMPILER and
# CMAKE_CUDA_ARCHITECTURES. Call sale_cuda_setup() AFTER project(): defines
# the interface target sale::cuda_flags and finds CUDA::cudart.

set(SALE_CUDA_ARCHS "$ENV{SALE_CUDA_ARCHS}" CACHE STRING
  "CUDA architectures, CMake spelling (e.g. 90a or 80;86;89;90a)")
if(SALE_CUDA_ARCHS STREQUAL "")
  set_property(CACHE SALE_CUDA_ARCHS PROPERTY VALUE "80;86;89;90a")
endif()
# Sources are compiled per architecture set (issue 7), each set a CMake CUDA_ARCHITECTURES list:
#   SALE_SM90_ARCHS  Hopper-only sources (wgmma, setmaxnreg): 90a SASS only. Arch-specific
#                    targets get SASS only ("-real"): their PTX runs on no other GPU.
#   SALE_SM8X_ARCHS  the sm8x sources (mma.sync, int4 tensor cores): SASS for every 8x entry plus
#                    PTX of the lowest one, which the driver JIT-compiles on any later GPU (how
#                    the sm8x path is tested on an H100, and what serves GPUs newer than sm_90).
#   SALE_ALL_ARCHS   sources that run everywhere (quantize): the union, plus any other entries.
# Two translation units of different sets never instantiate one kernel: the sm8x entries wrap
# the headers they share with the Hopper entries in their own namespace (*_sm8x_cuda.cu).
set(SALE_SM90_ARCHS "")
set(SALE_SM8X_ARCHS "")
set(SALE_ALL_ARCHS "")
set(_sale_sm8x_ptx "")
foreach(_arch IN LISTS SALE_CUDA_ARCHS)
  if(_arch STREQUAL "90a")
    list(APPEND SALE_SM90_ARCHS "90a-real")
    list(APPEND SALE_ALL_ARCHS "90a-real")
  elseif(_arch MATCHES "^8[0-9]$")
    list(APPEND SALE_SM8X_ARCHS "${_arch}-real")
    list(APPEND SALE_ALL_ARCHS "${_arch}-real")
    if(_sale_sm8x_ptx STREQUAL "" OR _arch LESS _sale_sm8x_ptx)
      set(_sale_sm8x_ptx "${_arch}")
    endif()
  elseif(_arch MATCHES "^[0-9]+a$")
    list(APPEND SALE_ALL_ARCHS "${_arch}-real")
  else()
    list(APPEND SALE_ALL_ARCHS "${_arch}")
  endif()
endforeach()
# SALE_SM8X_PTX_ARCHS: PTX only (the sm8x kernel tests: the driver JIT-compiles them on any 8.0+ GPU).
set(SALE_SM8X_PTX_ARCHS "")
if(NOT _sale_sm8x_ptx STREQUAL "")
  set(SALE_SM8X_PTX_ARCHS "${_sale_sm8x_ptx}-virtual")
  list(APPEND SALE_SM8X_ARCHS "${_sale_sm8x_ptx}-virtual")
  list(APPEND SALE_ALL_ARCHS "${_sale_sm8x_ptx}-virtual")
endif()
if(SALE_SM90_ARCHS STREQUAL "")
  message(FATAL_ERROR "sale_ops: SALE_CUDA_ARCHS is '${SALE_CUDA_ARCHS}'; it must contain 90a (the op entries "
    "carry the Hopper kernels), e.g. 90a or 80;86;89;90a")
endif()
# The default for targets without their own set (project()'s compiler check, tools).
set(CMAKE_CUDA_ARCHITECTURES ${SALE_ALL_ARCHS})

# Returns the real toolkit root of an nvcc, which may be a symlink or a shell
# wrapper (e.g. /usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc`).
# nvcc --dryrun prints `#$ _HERE_=<dir of the real nvcc binary>`.
function(_sale_nvcc_root nvcc out_var)
  execute_process(
    COMMAND "${nvcc}" --dryrun -c -x cu /dev/null -o /dev/null
    OUTPUT_VARIABLE _out ERROR_VARIABLE _out RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _out MATCHES "#\\$ _HERE_=([^\r\n]+)")
    get_filename_component(_root "${CMAKE_MATCH_1}/.." REALPATH)
  else()
    get_filename_component(_root "${nvcc}" REALPATH)
    get_filename_component(_root "${_root}/../.." REALPATH)
  endif()
  set(${out_var} "${_root}" PARENT_SCOPE)
endfunction()

if(NOT CMAKE_CUDA_COMPILER)
  if(NOT CUDAToolkit_ROOT AND NOT "$ENV{CUDAToolkit_ROOT}" STREQUAL "")
    set(CUDAToolkit_ROOT "$ENV{CUDAToolkit_ROOT}")
  endif()
  if(NOT "$ENV{CUDA_HOME}" STREQUAL "" AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
    set(_sale_root "$ENV{CUDA_HOME}")
  elseif(CUDAToolkit_ROOT AND EXISTS "${CUDAToolkit_ROOT}/bin/nvcc")
    set(_sale_root "${CUDAToolkit_ROOT}")
  else()
    if(NOT "$ENV{CUDACXX}" STREQUAL "")
      set(_sale_nvcc "$ENV{CUDACXX}")
    else()
      find_program(_sale_nvcc nvcc HINTS /usr/local/cuda/bin NO_CACHE)
    endif()
    if(_sale_nvcc)
      _sale_nvcc_root("${_sale_nvcc}" _sale_root)
    endif()
  endif()
  if(_sale_root)
    get_filename_component(_sale_root "${_sale_root}" REALPATH)
    set(CMAKE_CUDA_COMPILER "${_sale_root}/bin/nvcc" CACHE FILEPATH "CUDA compiler")
    set(CUDAToolkit_ROOT "${_sale_root}" CACHE PATH "CUDA toolkit root")
  endif()
  # else: let project() fail with CMake's own "No CMAKE_CUDA_COMPILER" error.
endif()

find_program(SALE_CCACHE ccache)
if(SALE_CCACHE)
  foreach(_lang CXX CUDA)
    if(NOT CMAKE_${_lang}_COMPILER_LAUNCHER)
      set(CMAKE_${_lang}_COMPILER_LAUNCHER "${SALE_CCACHE}")
    endif()
  endforeach()
endif()

function(sale_cuda_setup)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "sale_ops: nvcc ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}), "
                 "toolkit ${CUDAToolkit_LIBRARY_ROOT}")
  message(STATUS "sale_ops: CUDA architectures: ${SALE_CUDA_ARCHS} (Hopper sources: ${SALE_SM90_ARCHS}; "
                 "sm8x sources: ${SALE_SM8X_ARCHS}; the rest: ${SALE_ALL_ARCHS})")
  if(SALE_CCACHE)
    message(STATUS "sale_ops: using ccache ${SALE_CCACHE}")
  endif()

  add_library(sale_cuda_flags INTERFACE)
  add_library(sale::cuda_flags ALIAS sale_cuda_flags)
  # CUTLASS 4.2 and the stable-ABI headers need C++17 (both also build as
  # C++20, the standard torch itself uses).
  target_compile_features(sale_cuda_flags INTERFACE cxx_std_17 cuda_std_17)
  target_compile_options(sale_cuda_flags INTERFACE
    "$<$<COMPILE_LANGUAGE:CUDA>:-O3;--expt-relaxed-constexpr;--expt-extended-lambda;-lineinfo>")
endfunction()
