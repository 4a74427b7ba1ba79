# LibTorch from the project's venv (the PyPI torch==2.11.0 wheel), as the target defkv::torch.
#
# CPU builds link only the wheel's CPU libraries (libtorch_cpu, libc10) and skip TorchConfig:
# the wheel is a CUDA build, and TorchConfig's CUDA probing (a try_run that detects GPUs and
# needs an nvcc dialect CMake lacks for C++20) fails on machines without a GPU. CUDA builds
# (DEFKV_CUDA=ON, on the GPU machine) use find_package(Torch) as usual.
if(NOT Python3_EXECUTABLE AND EXISTS ${PROJECT_SOURCE_DIR}/.venv/bin/python)
  set(Python3_EXECUTABLE ${PROJECT_SOURCE_DIR}/.venv/bin/python CACHE FILEPATH "Python with torch")
endif()
find_package(Python3 REQUIRED COMPONENTS Interpreter)

add_library(defkv_torch INTERFACE)
add_library(defkv::torch ALIAS defkv_torch)
if(DEFKV_CUDA)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
                  OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
  list(APPEND CMAKE_PREFIX_PATH ${_torch_prefix})
  # Name the architecture so TorchConfig does not probe the machine's GPUs with a try_run.
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(ENV{TORCH_CUDA_ARCH_LIST} "9.0")
  endif()
  find_package(Torch REQUIRED)
  target_link_libraries(defkv_torch INTERFACE ${TORCH_LIBRARIES})
  target_compile_options(defkv_torch INTERFACE ${TORCH_CXX_FLAGS})
else()
  execute_process(COMMAND ${Python3_EXECUTABLE} -c "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__)"
                  OUTPUT_VARIABLE _torch_out OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_rc)
  if(NOT _torch_rc EQUAL 0)
    message(FATAL_ERROR "Cannot import torch with ${Python3_EXECUTABLE}: run scripts/setup (it creates .venv)")
  endif()
  string(REPLACE "\n" ";" _torch_out "${_torch_out}")
  list(GET _torch_out 0 DEFKV_TORCH_DIR)
  list(GET _torch_out 1 DEFKV_TORCH_VERSION)
  message(STATUS "LibTorch ${DEFKV_TORCH_VERSION} (CPU libraries) from ${DEFKV_TORCH_DIR}")
  foreach(_lib torch_cpu c10)
    find_library(DEFKV_LIB_${_lib} ${_lib} PATHS ${DEFKV_TORCH_DIR}/lib NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(defkv_torch INTERFACE ${DEFKV_LIB_${_lib}})
  endforeach()
  # Wheel headers are system includes: their warnings are not ours.
  target_include_directories(defkv_torch SYSTEM INTERFACE
    ${DEFKV_TORCH_DIR}/include ${DEFKV_TORCH_DIR}/include/torch/csrc/api/include)
  target_compile_definitions(defkv_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
endif()
