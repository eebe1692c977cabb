// English and Korean text, chosen from the browser's language.

/** @type {Record<string, Record<string, string>>} */
const TEXT = {
  en: {
    tagline: 'Video calls for small groups, straight from your browser. No accounts, no installs.',
    newRoom: 'Start a new room',
    joinByName: 'Join a room',
    roomName: 'Room name',
    roomNamePlaceholder: 'e.g. team-standup',
    go: 'Go',
    invalidRoom: 'Use letters, digits, "-", "_" or "." (up to 64), starting with a letter or digit.',
    checkLink: 'Test your camera, microphone and network',
    privacy: 'Media goes directly between participants; the server only introduces them.',
    yourName: 'Your name',
    namePlaceholder: 'How others see you',
    join: 'Join',
    joining: 'Joining…',
    camera: 'Camera',
    microphone: 'Microphone',
    noDevice: 'None',
    micOn: 'Microphone on',
    micOff: 'Microphone off',
    camOn: 'Camera on',
    camOff: 'Camera off',
    mute: 'Mute microphone (M)',
    unmute: 'Unmute microphone (M)',
    stopVideo: 'Turn camera off (V)',
    startVideo: 'Turn camera on (V)',
    share: 'Share screen (S)',
    stopShare: 'Stop sharing (S)',
    chat: 'Chat (C)',
    chatTitle: 'Chat',
    leave: 'Leave call',
    copyLink: 'Copy invite link',
    copied: 'Link copied',
    roomLabel: 'Room',
    previewTitle: 'Ready to join?',
    previewHint: 'Check your camera and microphone. The address of this page is the invite link.',
    you: 'You',
    screenOf: '{name} (screen)',
    yourScreen: 'Your screen',
    stConnecting: 'Connecting…',
    stDirect: 'Connected directly',
    stRelay: 'Connected via relay',
    stRelayVia: 'Connected via relay ({proto})',
    stConnected: 'Connected',
    stReconnecting: 'Reconnecting…',
    stFailed: 'Connection failed',
    muted: 'Muted',
    cameraOff: 'Camera off',
    banner: 'Connection to the server lost. Reconnecting… Your call continues.',
    fullTitle: 'This room is full',
    fullText: 'The room already has {n} participants, the most it can hold. Try again later or start a new room.',
    tryAgain: 'Try again',
    newRoomInstead: 'Start a new room',
    pwTitle: 'This room needs a password',
    pwWrong: 'Wrong password. Try again.',
    password: 'Password',
    unreachableTitle: 'Cannot reach the server',
    unreachableText: 'The meshmeet server did not answer. Check your network connection and try again.',
    deniedText: 'Camera and microphone are blocked. You can still join to watch and listen; allow them in your browser settings to be seen and heard.',
    missingText: 'No camera or microphone found. You can still join to watch and listen.',
    partialText: 'Only part of your devices could be opened: {what}.',
    invalidRoomTitle: 'This room name is not valid',
    errorTitle: 'Something went wrong',
    leftTitle: 'You left the call',
    rejoin: 'Rejoin',
    home: 'Home',
    send: 'Send',
    chatPlaceholder: 'Message everyone',
    chatEmpty: 'No messages yet.',
    close: 'Close',
    controls: 'Call controls',
    participants: '{n} in call',
    enableSound: 'Click to enable sound',
    shareFailed: 'Screen sharing is not available.',
    shortcuts: 'Shortcuts: M mute · V camera · S share · C chat',
    checkTitle: 'Connection check',
    checkIntro: 'This page tests what a call needs: your camera and microphone, the connection to the server, and the network paths for media.',
    runCheck: 'Run the check again',
    backHome: 'Back to start',
  },
  ko: {
    tagline: '브라우저에서 바로 하는 소규모 화상 통화. 계정도 설치도 필요 없습니다.',
    newRoom: '새 방 만들기',
    joinByName: '방 참가하기',
    roomName: '방 이름',
    roomNamePlaceholder: '예: team-standup',
    go: '이동',
    invalidRoom: '문자, 숫자, "-", "_", "."만 쓸 수 있고(최대 64자), 문자나 숫자로 시작해야 합니다.',
    checkLink: '카메라, 마이크, 네트워크 점검하기',
    privacy: '미디어는 참가자끼리 직접 주고받으며, 서버는 연결만 도와줍니다.',
    yourName: '이름',
    namePlaceholder: '다른 사람에게 보일 이름',
    join: '참가',
    joining: '참가하는 중…',
    camera: '카메라',
    microphone: '마이크',
    noDevice: '없음',
    micOn: '마이크 켜짐',
    micOff: '마이크 꺼짐',
    camOn: '카메라 켜짐',
    camOff: '카메라 꺼짐',
    mute: '마이크 끄기 (M)',
    unmute: '마이크 켜기 (M)',
    stopVideo: '카메라 끄기 (V)',
    startVideo: '카메라 켜기 (V)',
    share: '화면 공유 (S)',
    stopShare: '화면 공유 중지 (S)',
    chat: '채팅 (C)',
    chatTitle: '채팅',
    leave: '통화 나가기',
    copyLink: '초대 링크 복사',
    copied: '링크를 복사했습니다',
    roomLabel: '방',
    previewTitle: '참가할 준비가 되셨나요?',
    previewHint: '카메라와 마이크를 확인하세요. 이 페이지의 주소가 초대 링크입니다.',
    you: '나',
    screenOf: '{name} (화면)',
    yourScreen: '내 화면',
    stConnecting: '연결 중…',
    stDirect: '직접 연결됨',
    stRelay: '릴레이로 연결됨',
    stRelayVia: '릴레이로 연결됨 ({proto})',
    stConnected: '연결됨',
    stReconnecting: '다시 연결 중…',
    stFailed: '연결 실패',
    muted: '음소거',
    cameraOff: '카메라 꺼짐',
    banner: '서버와의 연결이 끊겼습니다. 다시 연결하는 중… 통화는 계속됩니다.',
    fullTitle: '방이 가득 찼습니다',
    fullText: '이 방에는 이미 최대 인원인 {n}명이 있습니다. 나중에 다시 시도하거나 새 방을 만드세요.',
    tryAgain: '다시 시도',
    newRoomInstead: '새 방 만들기',
    pwTitle: '이 방은 비밀번호가 필요합니다',
    pwWrong: '비밀번호가 틀렸습니다. 다시 입력하세요.',
    password: '비밀번호',
    unreachableTitle: '서버에 연결할 수 없습니다',
    unreachableText: 'meshmeet 서버가 응답하지 않습니다. 네트워크 연결을 확인하고 다시 시도하세요.',
    deniedText: '카메라와 마이크가 차단되어 있습니다. 보고 듣기만 하며 참가할 수 있습니다. 브라우저 설정에서 허용하면 다른 사람에게 보이고 들립니다.',
    missingText: '카메라나 마이크를 찾을 수 없습니다. 보고 듣기만 하며 참가할 수 있습니다.',
    partialText: '일부 장치만 열 수 있었습니다: {what}.',
    invalidRoomTitle: '올바르지 않은 방 이름입니다',
    errorTitle: '문제가 발생했습니다',
    leftTitle: '통화에서 나왔습니다',
    rejoin: '다시 참가',
    home: '처음으로',
    send: '보내기',
    chatPlaceholder: '모두에게 메시지 보내기',
    chatEmpty: '아직 메시지가 없습니다.',
    close: '닫기',
    controls: '통화 제어',
    participants: '{n}명 참가 중',
    enableSound: '클릭해서 소리 켜기',
    shareFailed: '화면 공유를 사용할 수 없습니다.',
    shortcuts: '단축키: M 마이크 · V 카메라 · S 화면 공유 · C 채팅',
    checkTitle: '연결 점검',
    checkIntro: '통화에 필요한 것을 점검합니다: 카메라와 마이크, 서버 연결, 미디어가 오갈 네트워크 경로.',
    runCheck: '다시 점검하기',
    backHome: '처음으로',
  },
};

/** The language to use: the first of the browser's languages we have. */
export const lang = (() => {
  const prefs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || 'en'];
  for (const l of prefs) {
    const base = String(l).toLowerCase().split('-')[0];
    if (base in TEXT) return base;
  }
  return 'en';
})();

/**
 * Text for a key, with {placeholders} filled from vars.
 * @param {string} key
 * @param {Record<string, string|number>} [vars]
 * @returns {string}
 */
export function t(key, vars) {
  let s = TEXT[lang][key] ?? TEXT.en[key] ?? key;
  if (vars) {
    for (const [k, v] of Object.entries(vars)) s = s.split(`{${k}}`).join(String(v));
  }
  return s;
}

/**
 * Fills every element carrying data-i18n (text), data-i18n-placeholder,
 * data-i18n-aria (aria-label and title).
 * @param {ParentNode} root
 */
export function translate(root = document) {
  document.documentElement.lang = lang;
  for (const el of root.querySelectorAll('[data-i18n]')) {
    el.textContent = t(/** @type {HTMLElement} */ (el).dataset.i18n || '');
  }
  for (const el of root.querySelectorAll('[data-i18n-placeholder]')) {
    el.setAttribute('placeholder', t(/** @type {HTMLElement} */ (el).dataset.i18nPlaceholder || ''));
  }
  for (const el of root.querySelectorAll('[data-i18n-label]')) {
    el.setAttribute('aria-label', t(/** @type {HTMLElement} */ (el).dataset.i18nLabel || ''));
  }
  for (const el of root.querySelectorAll('[data-i18n-aria]')) {
    const s = t(/** @type {HTMLElement} */ (el).dataset.i18nAria || '');
    el.setAttribute('aria-label', s);
    el.setAttribute('title', s);
  }
}
